"""Where belle_edge keeps its own files (belle_edge/paths.py) and what its one hardware table states."""
import glob
import os
import re

import pytest

from belle_edge.paths import cache_dir, cache_or_temp_dir, kernels_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_cache_switched_off_creates_no_folder_named_off(tmp_path, monkeypatch):
    """BELLE_EDGE_CACHE=off once held for the converted checkpoints only: the kernel build and the engine
    builder's library links made a folder called "off" in the working directory."""
    from belle_edge.compile.build_engine import library_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BELLE_EDGE_CACHE", "off")
    assert cache_dir("gguf") is None
    links = cache_or_temp_dir("tensorrt_rtx_links")
    assert os.path.isdir(links) and not links.startswith(str(tmp_path))
    env = library_env()  # the TensorRT-RTX child's LD_LIBRARY_PATH, with its links in a temporary folder
    assert isinstance(env, dict)
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("BELLE_EDGE_CACHE", str(tmp_path / "cache"))
    assert cache_dir("kernels", "x") == str(tmp_path / "cache" / "kernels" / "x")


def test_only_paths_reads_the_cache_variable():
    """One helper decides where the cache is (and whether there is one): no other module reads the variable."""
    readers = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "belle_edge", "**", "*.py"), recursive=True)
               + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
               if re.search(r"environ\S*\(?\[?\s*(CACHE_ENV|[\"']BELLE_EDGE_CACHE)", open(p, encoding="utf-8").read())]
    assert readers == [os.path.join("belle_edge", "paths.py")]


def test_the_kernel_limits_in_the_table_are_the_kernels_own():
    """targets.KERNELS states what kernels/src checks; if a kernel gains a head size, the table must follow."""
    from belle_edge.targets import KERNELS

    src = kernels_dir()
    api = open(os.path.join(src, "src", "api.cu"), encoding="utf-8").read()
    launch = open(os.path.join(src, "src", "launch.h"), encoding="utf-8").read()
    head_dims = tuple(int(d) for d in re.findall(r"p->head_dim != (\d+)", api))
    assert head_dims == KERNELS.head_dims
    assert int(re.search(r"kMaxGroup = (\d+)", launch).group(1)) == KERNELS.max_group
    assert "BELLE_FP16" in api and "BELLE_BF16" in api and KERNELS.dtypes == ("float16", "bfloat16")


def test_every_target_lists_only_builders_whose_engines_run_on_it():
    from belle_edge.targets import BUILDERS, TARGETS

    for target in TARGETS.values():
        for name in target.builders:
            runs_on = BUILDERS[name].runs_on
            assert runs_on is None or target.sm in runs_on, (target.name, name)
    assert TARGETS["a100"].builders == ("tensorrt",) and 80 not in BUILDERS["tensorrt-rtx"].runs_on
    assert TARGETS["orin-agx"].builds_on_device and TARGETS["rtx3090"].builders[0] == "tensorrt-rtx"


@pytest.mark.parametrize("name,bandwidth", [("orin-agx", 204.8), ("rtx3090", 936), ("a100", 2039)])
def test_a_targets_bandwidth_gives_its_decode_roofline(name, bandwidth):
    from belle_edge.targets import TARGETS, check_memory

    record = check_memory(TARGETS[name], "fp16", params=3_000_000_000, layers=28, kv_heads=8, head_dim=128,
                          kv_tokens=2048)
    # 3B fp16 = 6 GB read per token: an AGX Orin can do at most ~34 tok/s (the arithmetic)
    assert record["decode_roofline_tok_s"] == round(bandwidth * 1e9 / 6e9, 1)
