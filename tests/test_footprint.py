"""Memory and bandwidth arithmetic in the formats the compiler stores (belle_edge/footprint.py), the memory check
that uses it (targets.py) and `belle-edge compile --dry-run`'s table."""
import json
import os

import pytest

from belle_edge.errors import InputError
from belle_edge.footprint import (BELLE_7B, BELLE_7B_PRUNED_3B, GIB, LLAMA_3_2_3B, count_params, footprint,
                                  kv_cache_bytes)
from belle_edge.models.config import ModelConfig
from belle_edge.targets import TARGETS, MemoryBudget, check_memory, memory_record

GPU, CPU = TARGETS["orin-nano"], TARGETS["cpu"]

# a small LLaMA by hand: per layer q (256,256) k (128,256) v (128,256) o (256,256) gate/up (512,256) down (256,512)
SMALL = ModelConfig(family="llama", vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, intermediate_size=512, max_positions=512, norm_eps=1e-5, norm="rms", mlp="swiglu",
                    positions="rope", tie_embeddings=False)
LINEAR = 2 * (256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 512 * 256)  # 1,179,648 weights in the linears
ROWS = 2 * (256 + 128 + 128 + 256 + 512 + 512 + 256)  # output rows of the linears
NORMS = 2 * 2 * 256 + 256  # two RMSNorms per layer + the final one
TABLE = 1000 * 256  # embedding = head


def test_parameter_count_by_shape_is_the_canonical_models():
    from belle_edge.compile.prune.plan import count_params as built_count  # builds the torch model on meta

    assert count_params(SMALL) == LINEAR + 2 * TABLE + NORMS
    bloom = BELLE_7B.replace(num_layers=2, hidden_size=96, num_heads=6, num_kv_heads=6, head_dim=16,
                             intermediate_size=384, vocab_size=500)
    qwen = SMALL.replace(family="qwen2", qkv_bias=True, tie_embeddings=True)
    for cfg in (SMALL, bloom, qwen):
        assert count_params(cfg) == built_count(cfg), cfg
    assert count_params(LLAMA_3_2_3B) == 3_212_749_824  # Meta's "3.21B", the tied head counted once
    assert count_params(BELLE_7B) == 7_069_016_064


def test_gpu_formats_by_hand():
    int4 = footprint(SMALL, GPU, "int4")
    # every K here is a multiple of 128: 4-bit codes + one fp16 scale per group of 128
    assert int4.breakdown["linears"]["bytes"] == LINEAR // 2 + 2 * LINEAR // 128
    assert int4.breakdown["head"]["bytes"] == 2 * TABLE  # the LM head stays fp16
    assert int4.breakdown["embedding"]["bytes"] == 2 * TABLE  # untied: held in memory...
    assert int4.weights_bytes == LINEAR // 2 + 2 * LINEAR // 128 + 4 * TABLE + 2 * NORMS
    assert int4.read_per_token_bytes == int4.weights_bytes - 2 * TABLE  # ...but only gathered, one row per token
    assert int4.parameters == count_params(SMALL)

    int8 = footprint(SMALL, GPU, "int8")
    assert int8.breakdown["linears"]["bytes"] == LINEAR + 2 * ROWS  # one fp16 scale per output row
    head8 = footprint(SMALL, GPU, "int8", head="int8")
    assert head8.breakdown["head"]["bytes"] == TABLE + 2 * 1000
    assert head8.breakdown["embedding"]["bytes"] == 2 * TABLE

    fp16 = footprint(SMALL, GPU, "fp16")
    assert fp16.weights_bytes == 2 * count_params(SMALL)
    with pytest.raises(InputError, match="head 'int2'"):
        footprint(SMALL, GPU, "int4", head="int2")


def test_a_tied_head_is_stored_once_and_read():
    tied = SMALL.replace(tie_embeddings=True)
    fp = footprint(tied, GPU, "int4")
    assert fp.breakdown["embedding"]["bytes"] == 0 and fp.breakdown["head"]["bytes"] == 2 * TABLE
    assert fp.read_per_token_bytes == fp.weights_bytes  # nothing is held that a step does not read
    assert fp.describe() == "int4 g128 linears, fp16 head (= the embedding)"


def test_cpu_formats_by_hand():
    # MatMulNBits, block 32: 8-bit = codes + fp32 scale + uint8 zero point per block
    int8 = footprint(SMALL, CPU, "int8")
    assert int8.breakdown["linears"]["bytes"] == LINEAR * (32 + 5) // 32
    assert int8.breakdown["head"]["bytes"] == TABLE * (32 + 5) // 32
    assert int8.breakdown["embedding"]["bytes"] == 4 * TABLE and int8.breakdown["other"]["bytes"] == 4 * NORMS
    # 4-bit = codes + fp32 scale + fp32 offset + a 4-bit zero point per block; the head stays 8-bit
    int4 = footprint(SMALL, CPU, "int4")
    assert int4.breakdown["linears"]["bytes"] == LINEAR // 2 + LINEAR * (4 + 4 + 0.5) / 32
    assert int4.breakdown["head"]["bytes"] == TABLE * (32 + 5) // 32
    assert footprint(SMALL, CPU, "int8", block_size=64).breakdown["linears"]["bytes"] == LINEAR * (64 + 5) // 64
    assert footprint(SMALL, CPU, "fp32").weights_bytes == 4 * count_params(SMALL)
    assert footprint(SMALL, CPU, "fp16").weights_bytes == 2 * count_params(SMALL)


def test_the_3b_figures():
    fp16, int4 = footprint(LLAMA_3_2_3B, GPU, "fp16"), footprint(LLAMA_3_2_3B, GPU, "int4")
    assert fp16.weights_bytes == 2 * 3_212_749_824
    head = 128256 * 3072
    linears = 3_212_749_824 - head - (28 * 2 + 1) * 3072
    assert int4.weights_bytes == linears // 2 + linears // 64 + 2 * head + 2 * (28 * 2 + 1) * 3072
    assert round(int4.weights_bytes / GIB, 2) == 2.09  # the fp16 head is 37% of it
    assert kv_cache_bytes(LLAMA_3_2_3B, "int4", 4096) == 4096 * 28 * 2 * 8 * 128 * 2  # 448 MiB
    # the pruned BELLE plan is our planner's width plan of BLOOM-7b1 at 3B (footprint.py's docstring)
    from belle_edge.compile.prune.plan import config_for, solve

    (plan,) = solve(BELLE_7B, 3_000_000_000, "width")
    assert config_for(BELLE_7B, plan.shape) == BELLE_7B_PRUNED_3B
    assert count_params(BELLE_7B_PRUNED_3B) == plan.params_after == 3_002_557_440


def test_nano_refuses_belle_7b_fp16_and_takes_it_at_int4():
    with pytest.raises(InputError) as e:
        check_memory(GPU, "fp16", config=BELLE_7B, kv_tokens=2048)
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        "the model does not fit orin-nano (8 GiB): weights 7,069,016,064 parameters as fp16 linears, fp16 head "
        "(= the embedding) = 13.17 GiB + KV cache 2048 tokens x 30 layers x 2 x 32 heads x 128 x 2 B = 0.94 GiB = "
        "14.10 GiB > 8 GiB; prune it, quantize further (--precision int8 or int4), or lower --max-kv-tokens")
    record = check_memory(GPU, "int4", config=BELLE_7B, kv_tokens=2048)
    assert record["fits"] and record["weights_gib"] == 4.817 and record["total_gib"] < 8
    # what the compile path records: bytes read per token and the roofline at the target's bandwidth
    record = MemoryBudget(GPU, "int4", 4096).check(LLAMA_3_2_3B, 3_212_749_824)
    read = footprint(LLAMA_3_2_3B, GPU, "int4").read_per_token_bytes
    assert record["read_per_token_gb"] == round(read / 1e9, 3)
    assert record["decode_roofline_tok_s"] == round(68e9 / read, 1) == 30.3
    assert record["kv_tokens"] == 4096 and record["parameters"] == 3_212_749_824
    assert MemoryBudget(GPU, "int4", 4096).check(BELLE_7B_PRUNED_3B)["kv_tokens"] == 2048  # its positions
    # a long cache tips Llama-3.2-3B fp16 over the Nano's 8 GiB; int4 still fits
    assert not memory_record(GPU, "fp16", config=LLAMA_3_2_3B, kv_tokens=32768)["fits"]
    assert memory_record(GPU, "int4", config=LLAMA_3_2_3B, kv_tokens=32768)["fits"]


def test_dry_run_prints_the_orin_table_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from belle_edge.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["compile", "--dry-run", "--shape", "all", "--out", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["model", "precision"]
    for name in ("orin-agx 64 GiB 204.8 GB/s", "orin-nx 16 GiB 102.4 GB/s", "orin-nano 8 GiB 68 GB/s"):
        assert name in lines[0]
    rows = lines[2:8]  # under the header and its rule
    assert [r.split()[:2] for r in rows] == [[m, p] for m in ("llama-3.2-3b", "belle-7b-pruned-3b")
                                             for p in ("fp16", "int8", "int4")]
    assert lines[8] == ""
    int4 = next(r for r in rows if r.startswith("llama-3.2-3b") and " int4 " in r)
    assert "3.213B" in int4 and "2.09" in int4 and "0.44 (4096)" in int4 and "fits, <= 30.3 tok/s" in int4
    assert "0.59 (2048)" in next(r for r in rows if r.startswith("belle-7b-pruned-3b"))
    assert "no reserve is subtracted" in out and "not 80" in out  # BELLE-3B's head size: the plugin note


def test_dry_run_of_a_model_reads_only_its_config(tmp_path, capsys):
    from belle_edge.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    # a config.json and no weights: the dry run must not need them
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
        "max_position_embeddings": 512, "tie_word_embeddings": False}))
    assert main(["compile", str(folder), "--dry-run", "--target", "orin", "--precision", "int4"]) == 0
    out = capsys.readouterr().out
    assert os.listdir(folder) == ["config.json"]
    row = next(line for line in out.splitlines() if line.startswith(str(folder)))
    assert f"{count_params(SMALL) / 1e9:.3f}B" in row and "0.00 (512)" in row
    assert "int4: int4 g128 linears, fp16 head, fp16 embedding" in out


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "--shape", "llama-3.2-7b"], "--shape 'llama-3.2-7b': unknown; known: llama-3.2-3b, "
                                               "belle-7b-pruned-3b, all"),
    ([], "compile: --out DIR is required"),
    (["--dry-run", "--shape", "all", "--precision", "fp8"], "precision 'fp8' is not available on target orin-agx"),
])
def test_dry_run_bad_input_is_one_line(args, message, capsys):
    from belle_edge.cli import main

    assert main(["compile", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_the_head_option_changes_weight_only_artifacts_only():
    from belle_edge.footprint import footprint, plan_config
    from belle_edge.targets import TARGETS

    cfg, orin = plan_config("llama-3.2-3b"), TARGETS["orin-agx"]
    assert footprint(cfg, orin, "fp16", head="int8") == footprint(cfg, orin, "fp16")
    smaller = footprint(cfg, orin, "int4").weights_bytes - footprint(cfg, orin, "int4", head="int8").weights_bytes
    vocab_by_hidden = cfg.vocab_size * cfg.hidden_size
    assert smaller == 2 * vocab_by_hidden - (vocab_by_hidden + 2 * cfg.vocab_size)  # fp16 -> int8 + a scale per row
