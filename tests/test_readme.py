"""The README's embedding example runs as written."""
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_has_the_two_quickstart_commands():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    quick = text.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make (\w+)", quick, flags=re.M) == ["demo", "test"]


def _block(marker: str) -> str:
    (block,) = [b for b in python_blocks() if marker in b]
    return block


@pytest.mark.slow
def test_the_embedding_example_runs_as_written(tmp_path, smollm2_checkpoint):
    # smollm2_checkpoint: the default model is already converted into this run's cache
    example = _block("model.session(")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "tokens in the KV cache" in result.stdout
    assert (tmp_path / "dialogue.npz").exists()


@pytest.mark.slow
def test_the_batched_engine_example_runs_as_written(tmp_path):
    """(The OpenAI client example needs a running server: tests/test_serve.py drives the same calls.)"""
    result = subprocess.run([sys.executable, "-c", _block("BatchEngine(")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.split()[0] in ("eos", "stop", "length") for line in lines), lines
