"""`belle-edge bench` on a tiny model: the JSON document, interleaved variants, skips with reasons."""
import json
import os
import subprocess
import sys



def test_bench_reports_every_variant_with_medians_and_ratios(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "belle_edge.cli", "bench", tiny_llama_dir, "--backends",
         "ort-fp32,ort-int8,torch-fp32,transformers-fp32,llamacpp-q4", "--runs", "2", "--new-tokens", "6",
         "--prompt-tokens", "24", "--turns", "3", "--turn-new-tokens", "4", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"cpu", "cores", "threads", "mem_bw_gbs"} <= set(doc["machine"])
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"ort-fp32", "ort-int8", "torch-fp32", "transformers-fp32"}
    for r in rows.values():
        assert r["runs"] == 2 and r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["decode_tok_s_range"][0] <= r["decode_tok_s"] <= r["decode_tok_s_range"][1]
        assert {"backend", "precision", "prefill_tok_s", "roofline_pct"} <= set(r)
    assert rows["ort-fp32"]["decode_x_transformers-fp32"] > 0
    assert doc["settings"]["prompt_tokens"] >= 20
    # the tiny checkpoint is no GGUF: the llama.cpp peer is skipped with the reason, not faked
    assert [s["backend"] for s in doc["skipped"]] == ["llamacpp-q4"]
    assert "GGUF" in doc["skipped"][0]["reason"] or "not installed" in doc["skipped"][0]["reason"]
    assert len(doc["turns"]) == 3 * 4 and {t["turn"] for t in doc["turns"]} == {1, 2, 3}
    for name in ("bench.md", "bench.json", "bench.png"):
        assert os.path.getsize(out / name) > 0


def test_bench_refuses_an_unknown_backend(tiny_llama_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "belle_edge.cli", "bench", tiny_llama_dir, "--backends",
                             "ort-fp32,vllm", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--backends: unknown vllm" in result.stderr


# A peer whose native code crashes mid-run (llama-cpp-python built natively on an AMX Xeon segfaults in its
# first decode): it loads, answers "ready", then dies of SIGSEGV on its first request.
CRASHING_PEER = """
import json, os, signal, sys
sys.stdin.readline()
print(json.dumps({"ready": True, "peak_rss_mb": 1.0}), flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_a_peer_that_dies_is_skipped_with_its_signal_and_the_others_still_run(tiny_llama_dir):
    from benchmarks.latency import _interleave, _start_workers
    from belle_edge.core.load import load_tokenizer

    prompt = load_tokenizer(tiny_llama_dir).encode("你好！请问订单发货了吗？").ids
    specs = {"torch-fp32": {"kind": "belle-torch", "checkpoint": tiny_llama_dir, "threads": 1},
             "llamacpp-q4": {"worker": [sys.executable, "-c", CRASHING_PEER], "threads": 1},
             "transformers-fp32": {"worker": [sys.executable, "-c", "import sys; sys.exit(3)"], "threads": 1}}
    workers, skipped = _start_workers(specs, [])
    assert set(workers) == {"torch-fp32", "llamacpp-q4"}  # the third exited while loading
    try:
        results = _interleave(workers, {"op": "single", "prompt_ids": prompt, "new_tokens": 4}, 2, skipped=skipped)
    finally:
        for w in workers.values():
            w["proc"].kill()
    assert set(results) == set(workers) == {"torch-fp32"} and len(results["torch-fp32"]) == 2
    reasons = {s["backend"]: s["reason"] for s in skipped}
    assert reasons == {"transformers-fp32": "the worker exited with status 3 while loading",
                       "llamacpp-q4": "the worker died of SIGSEGV"}


def test_bytes_read_per_token_leave_out_an_untied_input_embedding(tiny_tokenizer, tmp_path):
    """A decode step reads one row of an untied embedding table, but all of a tied one (the LM head is it)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from benchmarks.latency import _artifact_weight_bytes, _param_bytes
    from belle_edge.compile.pipeline import CompileConfig, compile_model
    from belle_edge.core.load import load_checkpoint
    from conftest import make_tiny_qwen2

    for tie in (True, False):
        src = str(tmp_path / f"qwen-tie{tie}")
        make_tiny_qwen2(src, tiny_tokenizer, tie=tie)
        ckpt = load_checkpoint(src)
        embed = ckpt.state_dict["embed.weight"].numel()
        total = sum(v.numel() for v in ckpt.state_dict.values())
        assert _param_bytes(ckpt) == 4 * (total - (0 if tie else embed))
        for precision in ("fp32", "int8"):
            art = str(tmp_path / f"art-{tie}-{precision}")
            compile_model(CompileConfig(out=art, model=src, precision=precision), progress=False)
            data = os.path.getsize(os.path.join(art, "model.onnx.data"))
            read = _artifact_weight_bytes(art)
            if tie:
                assert read == data
            else:  # fp32: the whole fp32 table; int8: its codes, scales and zero points
                assert data - read >= (4 * embed if precision == "fp32" else embed)
