"""`compile` -> artifact -> chat on ONNX Runtime, without torch; manifest, refusals, atomicity."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from belle_edge import load
from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.errors import InputError
from belle_edge.manifest import ArtifactError, read_manifest

CLI = [sys.executable, "-m", "belle_edge.cli"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama_dir):
    out = str(tmp_path_factory.mktemp("artifacts") / "tiny-fp32")
    compile_model(CompileConfig(out=out, model=tiny_llama_dir), progress=False)
    return out


def test_the_artifact_describes_itself(artifact):
    m = read_manifest(artifact, verify_hashes=True)
    assert [s.name for s in m.stages] == ["load", "export", "package"]
    for stage in m.stages:
        assert stage.seconds >= 0 and stage.peak_rss_mb > 0
    assert set(m.files) == {"model.onnx", "model.onnx.data", "tokenizer.json"}
    assert m.model.family == "llama" and m.target == "cpu" and m.precision == "fp32"
    assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(m.tools)
    assert m.chat_format["kind"] == "template" and m.runtime.stop_token_ids


def test_an_artifact_chats_like_the_checkpoint(artifact, tiny_llama_dir):
    compiled, source = load(artifact), load(tiny_llama_dir)
    assert compiled.backend_name == "onnxruntime"
    a, b = compiled.session(max_new_tokens=8), source.session(max_new_tokens=8)
    for message in ["你好", "订单已经发货了吗？", "Thanks!"]:
        assert a.send(message).text == b.send(message).text


def test_an_artifact_chats_with_torch_unimportable(artifact):
    script = textwrap.dedent('''
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "safetensors", "onnx"):
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, Block())
        import belle_edge
        model = belle_edge.load(sys.argv[1])
        session = model.session(max_new_tokens=6)
        for message in ("你好", "Thanks!"):
            session.send(message)
        from belle_edge.runtime.engine import BatchEngine, EngineConfig
        with BatchEngine(model, EngineConfig(max_batch=2, kv_tokens=128)) as engine:  # the batched engine too
            gens = [engine.submit([{"role": "user", "content": m}], max_tokens=4) for m in ("你好", "Thanks!")]
            assert all(isinstance("".join(g), str) and g.finish_reason for g in gens)
        assert "torch" not in sys.modules
        print("chatted", session.turn, "turns on", model.backend_name)
    ''')
    result = subprocess.run([sys.executable, "-c", script, artifact], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "chatted 2 turns on onnxruntime" in result.stdout


def test_compile_refuses_an_existing_output_unless_forced(artifact, tiny_llama_dir):
    with pytest.raises(InputError, match="already exists; pass --force"):
        compile_model(CompileConfig(out=artifact, model=tiny_llama_dir), progress=False)
    before = read_manifest(artifact).created
    compile_model(CompileConfig(out=artifact, model=tiny_llama_dir, force=True), progress=False)
    assert read_manifest(artifact).files and os.listdir(os.path.dirname(artifact)) == [os.path.basename(artifact)]
    assert before <= read_manifest(artifact).created


def test_a_failed_compile_leaves_nothing_that_looks_complete(tmp_path, tiny_llama_dir, monkeypatch):
    import belle_edge.compile.export_onnx as export_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C in the middle of the export

    monkeypatch.setattr(export_module, "export_onnx", interrupted)
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        compile_model(CompileConfig(out=str(out), model=tiny_llama_dir), progress=False)
    assert os.listdir(tmp_path) == []


def test_compile_quantized_records_its_fidelity(tmp_path, tiny_llama_dir):
    out = str(tmp_path / "int4")
    m = compile_model(CompileConfig(out=out, model=tiny_llama_dir, precision="int4", fidelity_tokens=128),
                      progress=False)
    stages = {s.name: s.details for s in m.stages}
    assert stages["quantize"]["sources"] == {"rtn": 2 * 7 + 1}
    assert stages["export"]["quantized_matmuls"] == 15
    fidelity = stages["fidelity"]
    # a random tiny model has nearly flat logits, so near-ties decide top-1; KL is the sharper figure here
    assert fidelity["tokens"] == 128 and 0 <= fidelity["kl_mean"] < 0.01 and fidelity["top1_agreement"] >= 0.8
    # measured on the held-out texts, English and Chinese, never on the calibration half
    from belle_edge.core.texts import held_out_texts

    assert set(fidelity["texts"]) == set(held_out_texts()) >= {"en:pydoc_data.topics(odd)", "zh:zh_held_out.txt"}
    assert sum(t["tokens"] for t in fidelity["texts"].values()) == 128 and fidelity["reference"] == tiny_llama_dir
    assert load(out).session(max_new_tokens=4).send("你好").stats.new_tokens >= 1


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp8"], "precision 'fp8' is not available on target cpu (any CPU (ONNX Runtime)); it "
                             "supports fp32, fp16, int8, int4"),
    (["--target", "a100", "--precision", "fp8"], "precision 'fp8' is not available on target a100"),
    (["--target", "orin", "--precision", "fp8"], "it supports fp16, int8, int4"),
    (["--target", "jetson-tx2"], "target 'jetson-tx2': unknown; known: orin-agx"),
    (["--precision", "int4", "--block-size", "128"], "block size 128 does not divide the input width 64"),
])
def test_compile_refusals_are_one_line_errors(tmp_path, tiny_llama_dir, args, message):
    out = tmp_path / "art"
    result = subprocess.run([*CLI, "compile", tiny_llama_dir, "--out", str(out), "--no-progress", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_inspect_prints_the_manifest_and_verify_catches_damage(artifact, tmp_path):
    import shutil

    result = subprocess.run([*CLI, "inspect", artifact], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "stages" in result.stdout and "model.onnx.data" in result.stdout
    damaged = tmp_path / "damaged"
    shutil.copytree(artifact, damaged)
    data = damaged / "tokenizer.json"
    raw = bytearray(data.read_bytes())
    raw[10] ^= 1
    data.write_bytes(bytes(raw))
    result = subprocess.run([*CLI, "inspect", str(damaged), "--verify"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "sha256 differs" in result.stderr
    os.remove(damaged / "model.onnx.data")
    with pytest.raises(ArtifactError, match="model.onnx.data is missing"):
        load(str(damaged))


@pytest.mark.slow
def test_smollm2_compiles_to_int4_with_its_gguf_blocks(tmp_path, smollm2_checkpoint):
    out = str(tmp_path / "smol-int4")
    m = compile_model(CompileConfig(out=out, model="smollm2-135m", precision="int4", fidelity_tokens=256),
                      progress=False)
    stages = {s.name: s.details for s in m.stages}
    assert stages["quantize"]["sources"] == {"gguf:Q4_1": 210, "gguf:Q8_0": 1}  # carried over, not re-rounded
    assert stages["fidelity"]["top1_agreement"] >= 0.9
    assert m.files["model.onnx.data"].bytes < 125 * 2**20
    reply = load(out).session(max_new_tokens=16).send("Give me three tips for writing clear emails.")
    assert reply.text.strip()
    print(json.dumps(stages["fidelity"]))


def test_an_artifact_session_saves_and_restores_exactly(artifact, tmp_path):
    from belle_edge.runtime.sampler import SamplingConfig

    model = load(artifact)
    s = model.session(window=1, sinks=2, max_new_tokens=6, sampling=SamplingConfig(temperature=0.8, seed=5))
    for message in ("你好", "订单已经发货了吗？"):
        s.send(message)
    path = str(tmp_path / "s.npz")
    s.save(path)
    expected = s.send("Thanks!")
    got = model.restore(path).send("Thanks!")
    assert got.text == expected.text and got.stats.kv_tokens == expected.stats.kv_tokens


def test_a_half_precision_artifact_chats(tmp_path, tiny_llama_dir):
    out = str(tmp_path / "fp16")
    m = compile_model(CompileConfig(out=out, model=tiny_llama_dir, precision="fp16", fidelity_tokens=64),
                      progress=False)
    assert m.runtime.kv_dtype == "float16"
    assert m.stage("fidelity").details["kl_mean"] < 0.01
    reply = load(out).session(max_new_tokens=5).send("你好")
    assert reply.stats.new_tokens >= 1 and reply.stats.kv_tokens > 0


def test_targets_refuse_what_the_device_lacks_and_what_does_not_fit():
    from belle_edge.targets import TARGETS, check_memory, check_precision, get_target

    assert get_target("orin").sm == 87 and get_target("rtx3090").sm == 86 and get_target("a100").sm == 80
    for name in ("orin-agx", "orin-nx", "orin-nano", "rtx3090", "a100"):
        with pytest.raises(InputError, match="precision 'fp8' is not available"):
            check_precision(TARGETS[name], "fp8")
    check_precision(TARGETS["h100"], "fp8")
    # BELLE-7B (BLOOM, 7.07B parameters, 30 layers, 32 heads of 128) in fp16 on an 8 GB Orin Nano: no
    from belle_edge.footprint import BELLE_7B, BELLE_7B_PRUNED_3B

    with pytest.raises(InputError, match=r"does not fit orin-nano \(8 GiB\): weights 7,069,016,064 parameters as "
                                         r"fp16 linears, fp16 head \(= the embedding\) = 13.17 GiB \+ KV cache 4096 "
                                         r"tokens x 30 layers x 2 x 32 heads x 128 x 2 B"):
        check_memory(TARGETS["orin-nano"], "fp16", config=BELLE_7B, kv_tokens=4096)
    # pruned to 3B and int4, it does
    record = check_memory(TARGETS["orin-nano"], "int4", config=BELLE_7B_PRUNED_3B, kv_tokens=2048)
    assert record["total_gib"] < 8
    # with only a parameter count at hand, every parameter counts in the precision's linear format
    record = check_memory(TARGETS["orin-nano"], "int4", params=3_000_000_000, layers=30, kv_heads=32,
                          head_dim=128, kv_tokens=2048)
    assert record["weights_gib"] == round(3e9 * (0.5 + 2 / 128) / 2**30, 3)


def test_the_stages_run_alone_meet_on_disk(tmp_path, tiny_llama_dir):
    """quantize -> (a folder) -> export -> (an artifact): the same artifact as compile in one go, byte for
    byte in its weights, and a stop in between can be inspected and continued."""
    from belle_edge.cli import main
    from belle_edge.core.quantized import read_quantized

    q, art, whole = tmp_path / "q", tmp_path / "art", tmp_path / "whole"
    assert main(["quantize", tiny_llama_dir, "--precision", "int4", "--out", str(q)]) == 0
    ckpt, doc = read_quantized(str(q))
    assert doc["record"]["precision"] == "int4" and len(ckpt.quantized) == 2 * 7 + 1
    assert doc["source"]["path"] == tiny_llama_dir
    assert main(["export", str(q), "--out", str(art), "--no-progress"]) == 0
    m = read_manifest(str(art), verify_hashes=True)
    assert m.precision == "int4" and m.source.kind == "quantized" and m.source.path == str(q)
    assert [s.name for s in m.stages] == ["load", "export", "fidelity", "package"]
    assert m.stage("fidelity").details["reference"] == tiny_llama_dir  # the model it was quantized from
    one_go = compile_model(CompileConfig(out=str(whole), model=tiny_llama_dir, precision="int4"), progress=False)
    assert m.files["model.onnx.data"] == one_go.files["model.onnx.data"]
    a, b = load(str(art)).session(max_new_tokens=6), load(str(whole)).session(max_new_tokens=6)
    assert a.send("你好").text == b.send("你好").text


def test_a_quantized_checkpoint_exports_without_its_source(tmp_path, tiny_llama_dir):
    """Quantized on one machine, exported on another: the fidelity stage says why it measured nothing."""
    import shutil

    from belle_edge.cli import main

    source, q = tmp_path / "source", tmp_path / "q"
    shutil.copytree(tiny_llama_dir, source)
    assert main(["quantize", str(source), "--precision", "int8", "--out", str(q)]) == 0
    shutil.rmtree(source)
    m = compile_model(CompileConfig(out=str(tmp_path / "art"), model=str(q)), progress=False)
    assert m.precision == "int8" and "is not on this machine" in m.stage("fidelity").details["skipped"]
    assert load(str(tmp_path / "art")).session(max_new_tokens=3).send("你好").stats.new_tokens >= 1


def test_stages_run_alone_refuse_what_does_not_fit(tmp_path, tiny_llama_dir):
    from belle_edge.cli import main

    q = tmp_path / "q"
    assert main(["quantize", tiny_llama_dir, "--precision", "int8", "--out", str(q)]) == 0
    with pytest.raises(InputError, match="quantized to int8, not int4"):
        compile_model(CompileConfig(out=str(tmp_path / "a"), model=str(q), precision="int4"), progress=False)
    assert main(["quantize", tiny_llama_dir, "--precision", "fp16", "--out", str(tmp_path / "x")]) == 2
    assert main(["chat", str(q)]) == 2  # a quantized checkpoint is not a checkpoint chat opens: export it
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_a_qwen2_checkpoint_compiles_and_chats_like_itself(tmp_path, tiny_qwen2_dir):
    """The third family through compile: fp32 replies equal the checkpoint's, int4 keeps close to it."""
    out = str(tmp_path / "fp32")
    m = compile_model(CompileConfig(out=out, model=tiny_qwen2_dir), progress=False)
    assert m.model.family == "qwen2" and m.model.qkv_bias and m.model.tie_embeddings
    a, b = load(out).session(max_new_tokens=8), load(tiny_qwen2_dir).session(max_new_tokens=8)
    for message in ("你好", "订单已经发货了吗？"):
        assert a.send(message).text == b.send(message).text
    q = compile_model(CompileConfig(out=str(tmp_path / "int4"), model=tiny_qwen2_dir, precision="int4",
                                    fidelity_tokens=64), progress=False)
    assert q.stage("quantize").details["sources"] == {"rtn": 2 * 7 + 1}
    assert q.stage("fidelity").details["kl_mean"] < 0.05
