"""The runtime core must import and work on a device with no torch (a Jetson): run it with torch blocked."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    from tokenizers import Tokenizer

    import belle_edge
    from belle_edge.mask import MaskConfig
    from belle_edge.runtime.chat_format import make_chat_format
    from belle_edge.runtime.detokenizer import IncrementalDetokenizer
    from belle_edge.runtime.kv_cache import CacheLedger
    from belle_edge.runtime.model import ChatModel
    from belle_edge.runtime.sampler import Sampler, SamplingConfig
    from belle_edge.runtime.session import ChatSession
    from belle_edge.runtime.engine import BatchEngine, parse_messages
    from belle_edge.runtime.backends.ort_pool import OrtPool
    from belle_edge.runtime.scheduler import StepScheduler

    tok = Tokenizer.from_file(sys.argv[1])
    text = "你好！订单已经发货了。"
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in tok.encode(text).ids) == text

    ledger = CacheLedger(16)
    ledger.append(np.arange(10), np.arange(10), np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    keep = ledger.keep_slots(5, MaskConfig(window=1, sinks=1))
    assert keep.tolist() == [0, 1, 8, 9], keep

    assert Sampler(SamplingConfig())(np.array([0.1, 3.0, 0.2])) == 1
    fmt = make_chat_format("auto", template=None, bos_token=None, eos_token=None, where="x")
    assert fmt.turn_text("hi").startswith("Human:")
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    print("runtime core ok without torch")
''')


def test_runtime_core_imports_and_runs_with_torch_blocked(tmp_path, tiny_tokenizer):
    path = tmp_path / "tokenizer.json"
    tiny_tokenizer.save(str(path))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "runtime core ok without torch" in result.stdout


INSPECT = textwrap.dedent('''
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "safetensors", "rich", "onnx", "tqdm"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    from belle_edge.cli import main

    code = main(["inspect", sys.argv[1], "--verify"])
    assert "torch" not in sys.modules and "rich" not in sys.modules
    sys.exit(code)
''')


def test_inspect_works_on_a_device_with_only_the_runtime(tmp_path, tiny_llama_dir):
    """What jetson/build_engine.sh runs after building: `belle-edge inspect`, with belle_edge[onnx] only."""
    from belle_edge.compile.pipeline import CompileConfig, compile_model

    art = str(tmp_path / "art")
    compile_model(CompileConfig(out=art, model=tiny_llama_dir), progress=False)
    result = subprocess.run([sys.executable, "-c", INSPECT, art], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "stages:" in result.stdout and "model.onnx.data" in result.stdout
    assert "all file hashes match the manifest" in result.stdout
