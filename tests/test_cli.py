"""The `belle-edge` command as a user runs it: real subprocesses, exit codes, one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "belle_edge.cli"]


def run(*args, input=None, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, input=input, timeout=timeout)


def assert_one_line_error(result, pattern):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("belle-edge: error:")]
    assert len(errors) == 1 and pattern in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "dialogue.txt"
    path.write_text("# a comment\n你好\n\n订单已经发货了吗？\nThanks!\n", encoding="utf-8")
    return str(path)


def test_scripted_chat_prints_json_per_turn(tiny_llama_dir, script):
    result = run("chat", tiny_llama_dir, "--script", script, "--json", "--max-new-tokens", "5", "--window", "1")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [t["user"] for t in doc["turns"]] == ["你好", "订单已经发货了吗？", "Thanks!"]
    for turn in doc["turns"]:
        assert {"reply", "ttft_ms", "decode_tok_s", "kv_tokens", "prompt_tokens", "finish_reason"} <= set(turn)
    assert doc["window"] == 1 and doc["turns"][1]["turn"] == 2


def test_scripted_chat_prints_replies_and_stats(tiny_bloom_dir, script):
    result = run("chat", tiny_bloom_dir, "--script", script, "--max-new-tokens", "4", "--no-window")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("you> ") == 3 and "[turn 3 |" in result.stdout and "window off" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["chat", "/no/such/model", "--script", "{script}"], "/no/such/model: no such file or directory"),
    (["chat", "{tiny}", "--script", "/no/such/file.txt"], "cannot read the dialogue script"),
    (["chat", "{tiny}", "--script", "{empty}"], "has no messages"),
    (["chat", "{tiny}", "--json"], "--json needs --script"),
    (["chat", "{tiny}", "--script", "{script}", "--temperature", "-1"], "temperature: expected >= 0"),
    (["chat", "{tiny}", "--script", "{script}", "--chat-format", "chatml"], "chat format: expected one of"),
    (["chat", "{tiny}", "--script", "{long}", "--max-kv-tokens", "48"], "message too long"),
    (["chat", "{tiny}", "--restore", "{script}"], "not a readable belle_edge session file"),
])
def test_bad_input_gets_a_one_line_error_and_exit_2(tiny_llama_dir, script, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    long = tmp_path / "long.txt"
    long.write_text("订单已经发货了，预计三天内送达。" * 12 + "\n", encoding="utf-8")
    values = {"script": script, "tiny": tiny_llama_dir, "empty": str(empty), "long": str(long)}
    assert_one_line_error(run(*[a.format(**values) for a in args]), message)


def test_an_unknown_architecture_is_a_one_line_error(tiny_llama_dir, tmp_path, script):
    import shutil

    path = tmp_path / "gptj"
    shutil.copytree(tiny_llama_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gptj"
    (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("chat", str(path), "--script", script), "architecture 'gptj' is not supported")


def test_interactive_chat_commands_and_ctrl_c(tiny_llama_dir, tmp_path):
    """Ctrl-C stops the reply and keeps the session; /stats, /save, /reset and /exit work."""
    import threading

    proc = subprocess.Popen([*CLI, "chat", tiny_llama_dir, "--max-new-tokens", "100000", "--max-kv-tokens", "4096",
                             "--max-positions", "4096"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a shell running us in the background ignores SIGINT, and children inherit that;
                            # give the chat the default disposition a user's terminal gives it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = bytearray()
    threading.Thread(target=lambda: [seen.extend(b) for b in iter(lambda: proc.stdout.read1(4096), b"")],
                     daemon=True).start()

    def read_until(marker, limit=120):
        t0 = time.time()
        while marker not in seen.decode(errors="replace") and time.time() - t0 < limit:
            time.sleep(0.05)
        out = seen.decode(errors="replace")
        assert marker in out, out
        return out

    def send(text):
        proc.stdin.write(text.encode())
        proc.stdin.flush()

    def interrupt_reply(n):
        """Once the n-th reply is streaming (decoding, past its prefill), press Ctrl-C."""
        t0 = time.time()
        while time.time() - t0 < 120:
            parts = seen.decode(errors="replace").split("bot> ")
            if len(parts) > n and len(parts[n].strip()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        while seen.decode(errors="replace").count("[interrupted") < n and time.time() - t0 < 60:
            time.sleep(0.05)

    try:
        read_until("you> ")
        send("你好\n")
        interrupt_reply(1)
        send("Thanks!\n")  # the session goes on after the interrupt
        interrupt_reply(2)
        save = tmp_path / "s.npz"
        send(f"/pin 订单号 JD20240615123\n/unpin 电话\n/stats\n/save {save}\n/reset\n/exit\n")
        out = read_until("[dialogue reset]")
        assert out.count("[interrupted") == 2 and "[turn 2 |" in out  # /stats lists both turns
        assert "notes: 订单号: JD20240615123 (not in the cache yet" in out  # /pin, and /stats shows it
        assert f"saved to {save}" in out and save.exists()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def _has_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


@pytest.mark.slow
def test_demo_compiles_the_default_model_once_and_holds_a_chinese_dialogue():
    """The product path a new user sees: Qwen2.5-0.5B compiled for this CPU (int8 here, to keep the test to one
    compile; plain `demo` measures int8 against int4), then the customer-service script on ONNX Runtime."""
    from belle_edge.known_models import MODELS

    if MODELS["qwen2.5-0.5b"].path() is None:
        pytest.skip("Qwen2.5-0.5B is not fetched here: belle-edge fetch-model qwen2.5-0.5b (make does it)")
    result = run("demo", "--json", "--precision", "int8", "--max-new-tokens", "24", timeout=900)
    assert result.returncode == 0, result.stderr
    assert "compiling qwen2.5-0.5b for this CPU at int8" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"].startswith("Qwen2.5-Coder-0.5B-Instruct") and doc["model"].endswith("[cpu/int8]")
    assert doc["backend"] == "onnxruntime" and len(doc["turns"]) == 6
    assert all(t["ttft_ms"] > 0 and t["kv_tokens"] > 0 for t in doc["turns"])
    chinese = [t for t in doc["turns"] if _has_chinese(t["user"])]
    assert len(chinese) == 5 and all(_has_chinese(t["reply"]) for t in chinese), doc["turns"]
    again = run("demo", "--json", "--precision", "int8", "--max-new-tokens", "4")  # cached: no second compile
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr


def test_demo_refuses_a_bad_script_before_compiling(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n", encoding="utf-8")
    assert_one_line_error(run("demo", "--script", str(empty)), "the dialogue script has no messages")


def test_demo_precision_is_for_the_default_model_only(tiny_llama_dir):
    assert_one_line_error(run("demo", tiny_llama_dir, "--precision", "int4"),
                          "--precision applies to the default model's artifact")


def test_demo_runs_its_script_on_a_named_artifact(tiny_llama_dir, tmp_path):
    """What jetson/demo.sh runs on the device: `belle-edge demo ARTIFACT`, the tea-shop script on that artifact."""
    art = str(tmp_path / "art")
    assert run("compile", tiny_llama_dir, "--out", art, "--no-progress").returncode == 0
    result = run("demo", art, "--json", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["backend"] == "onnxruntime" and len(doc["turns"]) == 6 and "compiling" not in result.stderr
    assert doc["turns"][1]["user"] == "请问你们店里的西湖龙井茶叶还有货吗？"
