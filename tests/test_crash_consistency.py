"""Crash consistency: real belle-edge processes killed with SIGKILL at random moments, and what they leave.

A killed process runs no cleanup (no ``finally``, no ``except``), so only the order of renames protects the
user. For each writer, several runs are killed at fixed-seed random moments between the start and the
measured end of an uninterrupted run, and then:

* ``compile`` (new folder): the output folder is absent, or a whole artifact (manifest + every file's hash);
  nothing else that looks like an artifact is left beside it, and the next compile succeeds and removes the
  killed run's hidden work folder;
* ``compile --force`` over an artifact: the output is at every moment a whole artifact, the old or the new;
* ``prune``: the checkpoint folder is absent or loads;
* ``train sft``: ``--resume`` after the kill ends with exactly the weights of an uninterrupted run;
* ``data clean``: the output is absent or equal to an uninterrupted run's, never a prefix;
* a session's ``save`` over an earlier save: the file restores (the old session or the new one).

``BELLE_EDGE_CRASH_RUNS`` sets the kills per writer (default 2 in CI; dozens by hand).
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

RUNS = int(os.environ.get("BELLE_EDGE_CRASH_RUNS", "2"))
pytestmark = pytest.mark.slow


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "belle_edge.cli", *args]


def _timed(cmd) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return time.perf_counter() - t0


def _kill_after(cmd, delay: float) -> bool:
    """Run ``cmd`` and SIGKILL its whole process group after ``delay`` s; True if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _delays(seed: int, full: float) -> list[float]:
    # the interpreter's start and imports write nothing: spread the kills over the part that does
    rng = np.random.default_rng(seed)
    return sorted(float(d) for d in rng.uniform(0.15 * full, 0.8 * full, RUNS))


def _whole_artifact(folder: str) -> None:
    from belle_edge.manifest import read_manifest

    manifest = read_manifest(folder, verify_hashes=True)
    assert manifest.files, folder


def _lookalikes(parent: str, out: str) -> list[str]:
    """Folders beside ``out`` that a user would take for an artifact (visible, with a manifest)."""
    return [n for n in os.listdir(parent) if not n.startswith(".") and os.path.join(parent, n) != out
            and os.path.isfile(os.path.join(parent, n, "manifest.json"))]


def test_a_killed_compile_leaves_no_artifact_or_a_whole_one(tiny_llama_dir, tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    out = str(parent / "art")
    cmd = _cli("compile", tiny_llama_dir, "--target", "cpu", "--out", out)
    full = _timed(cmd)
    killed = 0
    for i, delay in enumerate(_delays(1, full)):
        if os.path.exists(out):
            subprocess.run(["rm", "-rf", out], check=True)
        killed += _kill_after(cmd, delay)
        if os.path.exists(out):
            _whole_artifact(out)
        assert _lookalikes(str(parent), out) == []
    # the next run succeeds and clears the hidden work folders the killed runs left
    subprocess.run(["rm", "-rf", out], check=True)
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    _whole_artifact(out)
    assert [n for n in os.listdir(parent) if n != "art"] == []
    print(f"compile: {killed}/{RUNS} runs killed (full run {full:.1f} s)")


def test_a_killed_forced_compile_keeps_a_whole_artifact_in_place(tiny_llama_dir, tmp_path):
    out = str(tmp_path / "art")
    cmd = _cli("compile", tiny_llama_dir, "--target", "cpu", "--out", out, "--force")
    full = _timed(cmd)
    killed = 0
    for delay in _delays(2, full):
        killed += _kill_after(cmd, delay)
        _whole_artifact(out)  # the old artifact, or the new one: never nothing, never half
    print(f"compile --force: {killed}/{RUNS} runs killed (full run {full:.1f} s)")


def test_a_killed_prune_leaves_no_checkpoint_or_one_that_loads(tiny_llama_dir, tmp_path):
    from belle_edge.core.load import load_checkpoint

    out = str(tmp_path / "pruned")
    cmd = _cli("prune", tiny_llama_dir, "--ratio", "0.7", "--mode", "width", "--calibration-tokens", "256",
               "--out", out, "--force")
    full = _timed(cmd)
    subprocess.run(["rm", "-rf", out], check=True)
    killed = 0
    for delay in _delays(3, full):
        killed += _kill_after(cmd, delay)
        if os.path.exists(out):
            load_checkpoint(out)
    print(f"prune: {killed}/{RUNS} runs killed (full run {full:.1f} s)")


def _dialogues(path: str, n: int) -> str:
    from belle_edge.core.dialogues import Dialogue, Turn, write_dialogues

    rng = np.random.default_rng(0)
    words = ["订单", "发货", "退款", "你好", "谢谢", "shipping", "order", "price", "颜色", "尺码", "周末", "地址"]
    dialogues = [Dialogue(turns=tuple(Turn(user=" ".join(rng.choice(words, 6)), assistant=" ".join(rng.choice(words, 9)))
                                      for _ in range(2)), system=None, id=f"d{i}") for i in range(n)]
    write_dialogues(dialogues, path)
    return path


@pytest.fixture(scope="module")
def dialogue_file(tmp_path_factory):
    return _dialogues(str(tmp_path_factory.mktemp("crash_data") / "dialogues.jsonl"), 24)


def test_a_killed_training_run_resumes_to_the_same_weights(tiny_llama_dir, dialogue_file, tmp_path):
    from safetensors.torch import load_file

    args = ["--data", dialogue_file, "--epochs", "2", "--batch-size", "2", "--save-every", "1", "--lora-rank", "4",
            "--max-len", "512", "--held-out", "0", "--seed", "5", "--no-progress"]
    reference = str(tmp_path / "reference")
    full = _timed(_cli("train", "sft", tiny_llama_dir, *args, "--out", reference))
    expected = load_file(os.path.join(reference, "adapter", "adapter_model.safetensors"))
    killed = 0
    for i, delay in enumerate(_delays(4, full)):
        run = str(tmp_path / f"run{i}")
        killed += _kill_after(_cli("train", "sft", tiny_llama_dir, *args, "--out", run), delay)
        resumed = subprocess.run(_cli("train", "sft", tiny_llama_dir, *args, "--out", run, "--resume"),
                                 capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        got = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
        assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got), f"run {i}"
    print(f"train sft: {killed}/{RUNS} runs killed and resumed to the uninterrupted weights (full run {full:.1f} s)")


def test_a_killed_data_clean_leaves_nothing_or_the_whole_output(tiny_llama_dir, tmp_path):
    dialogue_file = _dialogues(str(tmp_path / "raw.jsonl"), 3000)  # long enough for kills to land mid-run
    reference = str(tmp_path / "reference.jsonl")
    model = ["--model", tiny_llama_dir]  # token counts with the tiny tokenizer, not the default model's
    full = _timed(_cli("data", "clean", dialogue_file, "--out", reference, *model))
    with open(reference, "rb") as f:
        expected = f.read()
    out = str(tmp_path / "clean.jsonl")
    killed = 0
    for delay in _delays(5, full):
        if os.path.exists(out):
            os.remove(out)
        killed += _kill_after(_cli("data", "clean", dialogue_file, "--out", out, *model), delay)
        if os.path.exists(out):
            with open(out, "rb") as f:
                assert f.read() == expected
    print(f"data clean: {killed}/{RUNS} runs killed (full run {full:.1f} s)")


SAVER = r"""
import sys
from belle_edge.api import torch_chat_model
from belle_edge.core.load import load_checkpoint
model = torch_chat_model(load_checkpoint(sys.argv[1]))
session = model.session(window=1, sinks=2, max_new_tokens=4)
print("ready", flush=True)
for i in range(10_000):
    session.send(f"第{i}轮 你好")
    session.save(sys.argv[2])
"""


def test_a_session_killed_while_saving_leaves_a_file_that_restores(tiny_llama_dir, tmp_path):
    from belle_edge.api import torch_chat_model
    from belle_edge.core.load import load_checkpoint

    model = torch_chat_model(load_checkpoint(tiny_llama_dir))
    path = str(tmp_path / "session.npz")
    rng = np.random.default_rng(6)
    turns = []
    for _ in range(max(RUNS, 3)):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, tiny_llama_dir, path], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(float(rng.uniform(0.3, 2.0)))  # many saves a second: kills land inside them too
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if os.path.exists(path):
            turns.append(model.restore(path).turn)
    assert turns, "no save finished before the kills"
    print(f"session save: {len(turns)} kills, restored at turns {turns}")

