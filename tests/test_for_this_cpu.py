"""compile/for_this_cpu.py: the demo's artifact is compiled once per precision, the fastest one is measured
here and remembered per machine — on a tiny Qwen2, so the whole cycle takes seconds."""
import json
import os

from belle_edge.compile.for_this_cpu import CANDIDATES, artifact_for_this_cpu
from belle_edge.manifest import read_manifest


def test_the_fastest_precision_is_measured_once_and_remembered(tiny_qwen2_dir, private_model_cache):
    logs = []
    chosen = artifact_for_this_cpu(tiny_qwen2_dir, log=logs.append)
    assert chosen.startswith(os.path.join(private_model_cache, "artifacts"))
    compiles = [line for line in logs if line.startswith("compiling")]
    assert len(compiles) == len(CANDIDATES) == 2
    (choice_file,) = [f for f in os.listdir(os.path.dirname(chosen)) if f.endswith(".choice.json")
                      and f.startswith(os.path.basename(tiny_qwen2_dir))]
    choice_path = os.path.join(os.path.dirname(chosen), choice_file)
    with open(choice_path, encoding="utf-8") as f:
        choice = json.load(f)
    rates = choice["decode_tok_s"]
    assert set(rates) == set(CANDIDATES) and all(r > 0 for r in rates.values())
    assert choice["chosen"] == max(rates, key=rates.get) and read_manifest(chosen).precision == choice["chosen"]
    assert {"cpu", "threads", "onnxruntime"} <= set(choice["machine"])

    logs.clear()  # the same machine: the remembered choice, nothing compiled or timed
    assert artifact_for_this_cpu(tiny_qwen2_dir, log=logs.append) == chosen
    assert len(logs) == 1 and "measured before" in logs[0]

    choice["machine"]["cpu"] = "another processor"  # another machine: timed again, not compiled again
    with open(choice_path, "w", encoding="utf-8") as f:
        json.dump(choice, f)
    logs.clear()
    artifact_for_this_cpu(tiny_qwen2_dir, log=logs.append)
    assert not any(line.startswith("compiling") for line in logs) and sum("timing" in line for line in logs) == 1

    assert artifact_for_this_cpu(tiny_qwen2_dir, precision="int4", log=logs.append).endswith("-cpu-int4")


def test_an_unreadable_cached_artifact_is_compiled_again(tiny_qwen2_dir):
    from belle_edge.manifest import MANIFEST

    folder = artifact_for_this_cpu(tiny_qwen2_dir, precision="int8", log=lambda _: None)
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        f.write("{ not json")
    logs = []
    assert artifact_for_this_cpu(tiny_qwen2_dir, precision="int8", log=logs.append) == folder
    assert any(line.startswith("compiling") for line in logs) and read_manifest(folder).precision == "int8"


def test_a_cached_artifact_traced_with_an_older_mask_rule_is_compiled_again(tiny_qwen2_dir):
    """Compiled before pinned notes: its manifest has no runtime.mask_rule (rule 1), and notes would refuse it."""
    import json

    from belle_edge.manifest import MANIFEST
    from belle_edge.mask import RULE_VERSION

    folder = artifact_for_this_cpu(tiny_qwen2_dir, precision="int8", log=lambda _: None)
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    del manifest["runtime"]["mask_rule"]
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    logs = []
    assert artifact_for_this_cpu(tiny_qwen2_dir, precision="int8", log=logs.append) == folder
    assert any(line.startswith("compiling") for line in logs)
    assert read_manifest(folder).runtime.mask_rule == RULE_VERSION
