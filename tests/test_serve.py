"""The HTTP server (belle_edge/serve) with real clients: uvicorn in a thread on a free port, a real BatchEngine over
a tiny random LLaMA, the official ``openai`` client and raw httpx requests."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from belle_edge.errors import EngineClosedError, MissingDependencyError  # noqa: E402
from belle_edge.runtime.engine import BatchEngine, EngineConfig  # noqa: E402
from belle_edge.runtime.sampler import SamplingConfig  # noqa: E402
from belle_edge.serve.app import create_app  # noqa: E402
from conftest import serving  # noqa: E402

NAME = "tiny-llama"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def engine_reply(engine, messages, max_tokens: int, **kw) -> str:
    """What the engine itself answers (greedy unless ``sampling`` says otherwise)."""
    return "".join(engine.submit(messages, max_tokens=max_tokens, **kw))


def metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}, checking every line against the text format."""
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples, types = {}, {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-zA-Z_]+="[^"]*"(?:,[a-zA-Z_]+="[^"]*")*\})?) (\S+)', line)
            assert m, f"not a Prometheus sample line: {line!r}"
            samples[m.group(1)] = float(m.group(2))
    for name in samples:  # every sample belongs to a declared family
        base = re.sub(r"\{.*", "", name)
        assert base in types or re.sub(r"_(bucket|sum|count)$", "", base) in types, name
    return samples


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture(scope="module")
def model(tiny_llama_model):
    return tiny_llama_model


@pytest.fixture(scope="module")
def served(model):
    """The main server: 4 slots, a reply limit of 256 tokens."""
    engine = BatchEngine(model, EngineConfig(max_batch=4, max_queue=16))
    with serving(create_app(engine, model_name=NAME, max_tokens_limit=256)) as url:
        yield url, engine


# ---------------------------------------------------------------------------------------------- replies
def test_chat_completion_matches_the_engine_and_reports_usage(served):
    url, engine = served
    messages = [{"role": "system", "content": "你是客服。"}, *user("你好，请问订单发货了吗？")]
    reply = client(url).chat.completions.create(model="anything", messages=messages, temperature=0, max_tokens=24)
    assert reply.object == "chat.completion" and reply.model == NAME and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == engine_reply(engine, messages, 24)
    assert choice.finish_reason == "length"  # a random model does not find its stop token in 24 steps
    usage = reply.usage
    assert usage.completion_tokens == 24 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_notes_of_a_request_are_pinned_as_the_engine_pins_them(served):
    url, engine = served
    messages = user("我的快递到哪了？")
    notes = {"订单号": "JD20240615123", "电话": "13812345678"}
    reply = client(url).chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=12,
                                                extra_body={"notes": notes})
    assert reply.choices[0].message.content == engine_reply(engine, messages, 12, notes=notes)
    assert reply.choices[0].message.content != engine_reply(engine, messages, 12)  # the notes were read


def test_streamed_reply_equals_the_whole_one(served):
    url, _ = served
    api = client(url)
    messages = user("Hello! How can I help you today?")
    whole = api.chat.completions.create(model=NAME, messages=messages, temperature=0, max_completion_tokens=20)
    chunks = list(api.chat.completions.create(model=NAME, messages=messages, temperature=0, max_completion_tokens=20,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == NAME for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_server_sent_events_ending_in_done(served):
    url, _ = served
    body = {"messages": user("谢谢你的帮助！"), "stream": True, "temperature": 0, "max_tokens": 8}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        chunk = json.loads(event[len("data: "):])
        assert "usage" not in chunk  # only with stream_options.include_usage
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant"}
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_reply_before_them(served):
    url, _ = served
    api = client(url)
    messages = user("请提供您的订单号。")
    text = api.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=30) \
        .choices[0].message.content
    assert len(text) > 12
    stop = text[8:11]
    reply = api.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=30,
                                        stop=[stop, "never in a reply"])
    assert reply.choices[0].message.content == text[:text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(served):
    url, _ = served
    api = client(url)

    def sample(seed):
        return api.chat.completions.create(model=NAME, messages=user("你好"), temperature=1.0, top_p=0.95,
                                           seed=seed, max_tokens=16).choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_several_clients_at_once_get_their_replies_alone(served):
    url, engine = served
    prompts = ["你好！", "订单已经发货了吗？", "Hello, who are you?", "谢谢，我想查询物流。", "七天无理由退货", "Paris"]
    api = client(url)

    def ask(prompt):
        return api.chat.completions.create(model=NAME, messages=user(prompt), temperature=0,
                                           max_tokens=20).choices[0].message.content

    alone = [ask(p) for p in prompts]
    together = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def worker(i):
        start.wait()
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert engine.metrics().batch_occupancy > 1.0  # they were decoded in batches


def test_a_continued_conversation_reuses_its_cache(served, model):
    url, _ = served
    api = client(url)
    first = user("您好，这件商品支持七天无理由退货吗？")
    reply = api.chat.completions.create(model=NAME, messages=first, temperature=0, max_tokens=16)
    # a random model's reply splits characters (U+FFFD): its tokens differ from the text's encoding, which is
    # what a fresh engine prefills; the engine keeps only the cache both agree on
    assert "\ufffd" in reply.choices[0].message.content
    before = metrics(url)
    conversation = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                            {"role": "user", "content": "好的，谢谢！快递单号是多少？"}]
    again = api.chat.completions.create(model=NAME, messages=conversation, temperature=0, max_tokens=16)
    after = metrics(url)
    assert after["belle_reuse_hits_total"] == before["belle_reuse_hits_total"] + 1
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    with BatchEngine(model, EngineConfig(max_batch=1)) as fresh:
        assert again.choices[0].message.content == engine_reply(fresh, conversation, 16)


# ---------------------------------------------------------------------------------------------- cancelling
def test_closing_a_stream_cancels_its_generation(served):
    url, _ = served
    before = metrics(url)
    stream = client(url).chat.completions.create(model=NAME, messages=user("请介绍一下你自己。"), temperature=0,
                                                 max_tokens=256, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()

    def settled():
        m = metrics(url)
        return m["belle_requests_running"] == 0 and m["belle_kv_slots_busy"] == 0 and \
            m.get('belle_requests_total{status="499"}', 0) == before.get('belle_requests_total{status="499"}', 0) + 1

    assert wait_for(settled, 5.0), metrics(url)
    generated = metrics(url)["belle_completion_tokens_total"] - before["belle_completion_tokens_total"]
    assert 2 <= generated < 256  # stopped early, not run to its limit


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_leaves_while_queued_leaves_the_queue(model, stream):
    engine = BatchEngine(model, EngineConfig(max_batch=1, max_queue=1))
    with serving(create_app(engine, model_name=NAME)) as url:
        held = engine.submit(user("你好"), max_tokens=200)
        held.start()  # holds the only slot: the next request waits
        try:
            body = {"messages": user("hi"), "max_tokens": 4, "stream": stream}
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
            assert wait_for(lambda: engine.metrics().queue_depth == 0, 5.0)
            assert wait_for(lambda: metrics(url).get('belle_requests_total{status="499"}') == 1, 5.0)
        finally:
            held.close()
        assert engine.metrics().requests_running == 0


def test_requests_waiting_when_the_engine_closes_get_503(model):
    engine = BatchEngine(model, EngineConfig(max_batch=1, max_queue=1))
    with serving(create_app(engine, model_name=NAME)) as url:
        held = engine.submit(user("你好"), max_tokens=200)
        held.start()
        answers = []
        waiter = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 4}, timeout=30)))
        waiter.start()
        assert wait_for(lambda: engine.metrics().queue_depth == 1)
        closer = threading.Thread(target=engine.close, kwargs={"timeout": 0.1})
        closer.start()
        waiter.join(10)
        held.close()
        closer.join(10)
        assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "shutting_down"


# ---------------------------------------------------------------------------------------------- refusals
BAD_BODIES = [
    ("missing messages", {"model": NAME}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("wrong role", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("n=2", {"messages": user("hi"), "n": 2}, "n"),
    ("max_tokens above the limit", {"messages": user("hi"), "max_tokens": 257}, "max_tokens"),
    ("max_tokens zero", {"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ("max_tokens a string", {"messages": user("hi"), "max_tokens": "5"}, "max_tokens"),
    ("temperature out of range", {"messages": user("hi"), "temperature": 3}, "temperature"),
    ("top_p zero", {"messages": user("hi"), "top_p": 0}, "top_p"),
    ("stream not a boolean", {"messages": user("hi"), "stream": "yes"}, "stream"),
    ("five stop strings", {"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("seed a float", {"messages": user("hi"), "seed": 1.5}, "seed"),
    ("too many messages", {"messages": user("hi") * 257}, "messages"),
    ("ends with the assistant", {"messages": [*user("hi"), {"role": "assistant", "content": "yo"}]}, "messages"),
    ("empty message", {"messages": user("   ")}, "messages"),
    ("longer than the context", {"messages": user("订单已经发货了，预计三天内送达。" * 80)}, "messages"),
    ("notes not an object", {"messages": user("hi"), "notes": ["订单号", "JD1"]}, "notes"),
    ("a note of two lines", {"messages": user("hi"), "notes": {"地址": "北京\n朝阳"}}, "notes"),
    ("a note not a string", {"messages": user("hi"), "notes": {"订单号": 123}}, "notes"),
]


@pytest.mark.parametrize("body,param", [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES])
def test_server_rejects_bad_request_with_400(served, body, param):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""], ids=["broken", "array", "binary", "empty"])
def test_server_rejects_malformed_json_with_400(served, raw):
    url, _ = served
    r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request(served):
    url, _ = served
    api = client(url)
    for kwargs in ({"messages": [{"role": "robot", "content": "hi"}]}, {"messages": user("hi"), "n": 2},
                   {"messages": user("hi"), "max_tokens": 100_000}):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(model=NAME, **kwargs)
        assert e.value.status_code == 400 and e.value.body["param"]


def test_server_rejects_a_body_over_the_limit_with_413(served):
    url, _ = served
    body = {"messages": user("你" * 400_000)}  # 1.2 MB of UTF-8: over the 1 MB default
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        client(url).chat.completions.create(model=NAME, messages=body["messages"])
    assert e.value.status_code == 413


def test_unknown_route_is_an_openai_error(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/completions", json={})
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("no-such-model")


def test_queue_full_is_429_and_a_closed_engine_503(model):
    engine = BatchEngine(model, EngineConfig(max_batch=1, max_queue=0))
    with serving(create_app(engine, model_name=NAME)) as url:
        held = engine.submit(user("你好"), max_tokens=200)
        held.start()  # holds the only slot; nothing may wait
        try:
            with pytest.raises(openai.RateLimitError) as e:
                client(url).chat.completions.create(model=NAME, messages=user("hi"), max_tokens=4)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"]
            assert e.value.body["type"] == "rate_limit_error"
            assert metrics(url)['belle_requests_total{status="429"}'] == 1
        finally:
            held.close()
        ok = client(url).chat.completions.create(model=NAME, messages=user("hi"), max_tokens=4, temperature=0)
        assert ok.usage.completion_tokens == 4  # the slot is free again
        engine.close(timeout=1.0)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": user("hi")})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_server_requires_the_api_key_it_was_given(model):
    engine = BatchEngine(model, EngineConfig(max_batch=1))
    with serving(create_app(engine, model_name=NAME, api_key="s3cret-键")) as url:
        body = {"messages": user("你好"), "max_tokens": 4}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        for wrong in ("wrong", "s3cret", "Basic s3cret"):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {wrong}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").chat.completions.create(model=NAME, **body)
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        right = {"Authorization": "Bearer s3cret-键".encode("utf-8")}  # a header's bytes: the key in UTF-8
        assert httpx.post(f"{url}/v1/chat/completions", json=body, headers=right).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200  # open: a load balancer probes it


def test_api_key_works_with_the_openai_client(model):
    engine = BatchEngine(model, EngineConfig(max_batch=1))
    with serving(create_app(engine, model_name=NAME, api_key="k-123")) as url:
        reply = client(url, key="k-123").chat.completions.create(model=NAME, messages=user("hi"), max_tokens=3)
        assert reply.usage.completion_tokens == 3


# ---------------------------------------------------------------------------------------------- the rest
def test_models_health_metrics_and_page(served):
    url, _ = served
    assert [m.id for m in client(url).models.list()] == [NAME]
    assert client(url).models.retrieve(NAME).id == NAME
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    m = metrics(url)
    for name in ("belle_prompt_tokens_total", "belle_completion_tokens_total", "belle_reuse_hits_total",
                 "belle_reuse_misses_total", "belle_queue_depth", "belle_requests_running", "belle_batch_occupancy",
                 "belle_kv_tokens_used", "belle_kv_tokens_capacity", "belle_kv_slots_busy", "belle_kv_slots_total"):
        assert name in m, name
    assert m["belle_kv_slots_total"] == 4 and m["belle_kv_tokens_capacity"] > 0
    for hist in ("belle_time_to_first_token_seconds", "belle_time_per_output_token_seconds"):
        buckets = [v for k, v in m.items() if k.startswith(f"{hist}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[f"{hist}_count"]
        assert m[f'{hist}_bucket{{le="+Inf"}}'] == m[f"{hist}_count"] > 0  # earlier tests made requests
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "charset=utf-8" in page.headers["content-type"]
    for hook in ('id="message"', 'id="send"', 'id="log"', 'data-state="idle"'):
        assert hook in page.text


def test_shutting_the_server_down_closes_its_engine(model):
    engine = BatchEngine(model, EngineConfig(max_batch=1))
    with serving(create_app(engine, model_name=NAME)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
    with pytest.raises(EngineClosedError):
        engine.submit(user("hi"))


# ---------------------------------------------------------------------------------------------- the command
def test_serve_command_parses_its_flags():
    from belle_edge.cli import build_parser

    args = build_parser().parse_args(["serve", "model-dir", "--window", "off", "--port", "0", "--max-batch", "2"])
    assert args.window is None and args.port == 0 and args.max_batch == 2 and args.max_queue == 16
    assert build_parser().parse_args(["serve", "--window", "5"]).window == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--window", "wide"])


def test_serve_command_names_the_extra_when_uvicorn_is_missing(monkeypatch):
    from belle_edge.cli import build_parser

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    args = build_parser().parse_args(["serve", "whatever"])
    with pytest.raises(MissingDependencyError, match=r"belle_edge\[serve\]"):
        args.handler(args)


def test_serve_command_serves_and_stops_on_ctrl_c(tiny_llama_dir):
    env = {**os.environ, "BELLE_EDGE_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "belle_edge.cli", "serve", tiny_llama_dir, "--port", "0",
                             "--max-batch", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/ ..."
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/ ", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = found.group(1)
        assert wait_for(lambda: _health(url) == 200, 20)
        body = {"messages": user("你好"), "max_tokens": 3}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_rejects_a_port_in_use_before_loading(capsys):
    import socket

    from belle_edge.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "no-such-model-is-loaded", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def _health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_engine_reply_helper_is_greedy_by_default(served):
    """The comparisons above take the engine's own answer as truth: it must be the greedy one."""
    _, engine = served
    greedy = engine_reply(engine, user("你好"), 8, sampling=SamplingConfig(temperature=0.0))
    assert engine_reply(engine, user("你好"), 8) == greedy
