"""The batched engine (runtime/engine.py) over torch and ONNX Runtime pools: a batched step equals single
steps, concurrent dialogues equal the same dialogues alone, multi-turn reuse, the window, admission,
cancellation and shutdown."""
import threading
import time

import numpy as np
import pytest

from belle_edge import load
from belle_edge.compile.pipeline import CompileConfig, compile_model
from belle_edge.errors import EngineClosedError, InputError, QueueFullError
from belle_edge.mask import MaskConfig
from belle_edge.runtime.engine import BatchEngine, EngineConfig, parse_messages
from belle_edge.runtime.sampler import SamplingConfig

QUESTIONS = ["你好", "订单已经发货了吗？", "请问可以退货吗", "Thanks!", "今天天气怎么样", "运费是多少"]


@pytest.fixture(scope="module")
def qwen2_model(tiny_qwen2_dir):
    return load(tiny_qwen2_dir)


@pytest.fixture(scope="module")
def bloom_model(tiny_bloom_dir):
    return load(tiny_bloom_dir)


@pytest.fixture(scope="module")
def ort_model(tmp_path_factory, tiny_qwen2_dir):
    out = str(tmp_path_factory.mktemp("artifacts") / "tiny-qwen2")
    compile_model(CompileConfig(out=out, model=tiny_qwen2_dir), progress=False)
    return load(out)


def _alone(model, turns, message, *, max_tokens=12, window=3, system=None):
    """The reply a single ChatSession gives after being told ``turns``."""
    mask = MaskConfig(window=window) if window is not None else MaskConfig.off()
    session = model.session(system=system, window=mask.window, sinks=mask.sinks, max_new_tokens=max_tokens)
    for user, reply in turns:
        session.add_turn(user, reply)
    return session.send(message).text


def _messages(turns, message, system=None):
    out = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return out + [{"role": "user", "content": message}]


@pytest.mark.parametrize("which", ["qwen2_model", "bloom_model", "ort_model"])
def test_a_batched_step_equals_single_steps(request, which):
    """Rows of different lengths in one forward give each row's logits as it would alone."""
    model = request.getfixturevalue(which)
    pool = model.pool_factory(3, 64)
    mask = MaskConfig()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 200, size=n) for n in (5, 9, 3)]
    singles = []
    for prompt in prompts:  # alone, prompt then one token
        backend = model.backend_factory(64)
        backend.forward(prompt, np.arange(len(prompt)), np.ones(len(prompt), dtype=np.int64), mask=mask)
        singles.append(backend.forward(np.array([7]), np.array([len(prompt)]), np.array([1]), mask=mask))
    for slot, prompt in enumerate(prompts):
        pool.forward_rows([(slot, prompt, np.arange(len(prompt)), np.ones(len(prompt), dtype=np.int64))], mask=mask)
    batched = pool.forward_rows([(s, np.array([7]), np.array([len(p)]), np.array([1])) for s, p in enumerate(prompts)],
                                mask=mask)
    assert batched.shape == (3, model.tokenizer.get_vocab_size()) or batched.shape[0] == 3
    for one, row in zip(singles, batched):
        np.testing.assert_allclose(row, one, rtol=1e-4, atol=1e-4)
    assert [pool.n(s) for s in range(3)] == [len(p) + 1 for p in prompts]


@pytest.mark.parametrize("which", ["qwen2_model", "ort_model"])
def test_concurrent_dialogues_equal_the_same_dialogues_alone(request, which):
    model = request.getfixturevalue(which)
    conversations = [([], q) for q in QUESTIONS[:4]] + [([("你好", "您好，请问有什么可以帮您？")], "我想退货")]
    expected = [_alone(model, turns, message) for turns, message in conversations]
    with BatchEngine(model, EngineConfig(max_batch=3, kv_tokens=256, prefill_chunk=4)) as engine:
        gens = [engine.submit(_messages(t, m), max_tokens=12) for t, m in conversations]
        texts = [None] * len(gens)

        def run(i):
            texts[i] = "".join(gens[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(gens))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = engine.metrics()
    assert texts == expected
    assert metrics.requests_total == 5 and metrics.requests_running == 0 and metrics.queue_depth == 0
    assert metrics.batch_occupancy > 1.0, "no step carried more than one sequence"
    assert all(g.finish_reason in ("eos", "stop", "length") and g.completion_tokens > 0 for g in gens)


def test_the_next_turn_reuses_the_conversation_cache(qwen2_model):
    with BatchEngine(qwen2_model, EngineConfig(max_batch=2, kv_tokens=256)) as engine:
        first = engine.submit(_messages([], "你好", system="你是客服"), max_tokens=10)
        reply = "".join(first)
        assert not first.reused and first.cached_tokens == 0
        turns = [("你好", reply)]
        second = engine.submit(_messages(turns, "我想退货", system="你是客服"), max_tokens=10)
        text = "".join(second)
        assert second.reused and second.cached_tokens > 0
        assert second.prompt_tokens > second.cached_tokens
        # an edited earlier turn cannot use that cache: it starts over, and still answers correctly
        edited = [("你好!", reply)]
        third = engine.submit(_messages(edited, "我想退货", system="你是客服"), max_tokens=10)
        text3 = "".join(third)
        assert not third.reused
        m = engine.metrics()
    assert text == _alone(qwen2_model, turns, "我想退货", max_tokens=10, system="你是客服")
    assert text3 == _alone(qwen2_model, edited, "我想退货", max_tokens=10, system="你是客服")
    assert m.reuse_hits == 1 and m.reuse_misses == 2


@pytest.mark.parametrize("which", ["qwen2_model", "ort_model"])
def test_the_window_evicts_as_a_session_does(request, which):
    """Six turns with W=1 in a small pool: the engine's reply and cache equal a single session's."""
    qwen2_model = request.getfixturevalue(which)
    turns = [(q, f"好的，第{i}个问题的回答。") for i, q in enumerate(QUESTIONS[:5])]
    with BatchEngine(qwen2_model, EngineConfig(max_batch=1, kv_tokens=160, window=1)) as engine:
        gen = engine.submit(_messages(turns, QUESTIONS[5]), max_tokens=8)
        text = "".join(gen)
        held = engine.metrics().kv_tokens_used
    session = qwen2_model.session(window=1, max_new_tokens=8, max_kv_tokens=160)
    for user, reply in turns:
        session.add_turn(user, reply)
    assert text == session.send(QUESTIONS[5]).text
    assert held == session.kv_tokens


def test_requests_beyond_the_queue_are_refused_and_cancel_frees_the_slot(qwen2_model):
    with BatchEngine(qwen2_model, EngineConfig(max_batch=1, max_queue=1, kv_tokens=256)) as engine:
        running = engine.submit(_messages([], "你好"), max_tokens=200)
        stream = iter(running)
        next(stream)  # holds the only slot
        waiting = engine.submit(_messages([], "退货"), max_tokens=4)
        with pytest.raises(QueueFullError):
            engine.submit(_messages([], "运费"), max_tokens=4)
        done = threading.Event()
        threading.Thread(target=lambda: ("".join(waiting), done.set())).start()
        running.cancel()
        rest = list(stream)
        assert running.finish_reason == "cancelled" and len(rest) <= 2
        assert done.wait(30), "the waiting request never got the freed slot"
        assert waiting.finish_reason in ("eos", "stop", "length")
        assert engine.metrics().slots_busy == 0


def test_close_cancels_what_does_not_finish_and_refuses_new_requests(qwen2_model):
    engine = BatchEngine(qwen2_model, EngineConfig(max_batch=1, kv_tokens=256))
    gen = engine.submit(_messages([], "你好"), max_tokens=10_000)
    out = []
    worker = threading.Thread(target=lambda: out.extend(gen))
    worker.start()
    while not out and worker.is_alive():
        time.sleep(0.001)
    t0 = time.perf_counter()
    engine.close(timeout=0.0)
    worker.join(10)
    assert not worker.is_alive() and gen.finish_reason == "cancelled"
    assert time.perf_counter() - t0 < 10
    with pytest.raises(EngineClosedError):
        engine.submit(_messages([], "你好"))


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
])
def test_bad_messages_are_named(messages, problem):
    with pytest.raises(InputError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_messages(messages)


def test_an_overlong_message_fails_alone_and_the_engine_goes_on(qwen2_model):
    with BatchEngine(qwen2_model, EngineConfig(max_batch=1, kv_tokens=32)) as engine:
        bad = engine.submit(_messages([], "很长的消息" * 40), max_tokens=4)
        with pytest.raises(InputError, match="too long"):
            bad.start()
        good = engine.submit(_messages([], "你好"), max_tokens=4, sampling=SamplingConfig(temperature=0.8, seed=3))
        assert "".join(good) == "".join(engine.submit(_messages([], "你好"), max_tokens=4,
                                                      sampling=SamplingConfig(temperature=0.8, seed=3)))
        assert engine.metrics().slots_busy == 0


@pytest.mark.parametrize("which", ["qwen2_model", "bloom_model"])
def test_the_fused_pool_path_equals_the_reference_path(request, which):
    """The kernels' path (CUDA) runs the whole pool through the fused op with one start; on CPU the op is
    its reference implementation, so this checks the padding, the idle rows and the moves without a GPU."""
    from belle_edge.runtime.backends.torch_pool import TorchPool

    model = request.getfixturevalue(which)
    decoder = model.pool_factory(1, 8).decoder
    pools = [TorchPool(decoder, 4, 64, fused=False), TorchPool(decoder, 4, 64, fused=True)]
    mask = MaskConfig(window=1, sinks=2)
    rng = np.random.default_rng(1)
    prompts = {0: rng.integers(0, 200, size=6), 2: rng.integers(0, 200, size=11), 3: rng.integers(0, 200, size=2)}
    results = []
    for pool in pools:
        out = [pool.forward_rows([(s, p, np.arange(len(p)), np.full(len(p), 1 + s % 2))], mask=mask)
               for s, p in prompts.items()]
        for step in range(3):  # slot 1 stays idle; 0, 2, 3 decode together at different lengths
            rows = [(s, np.array([5 + step]), np.array([len(p) + step]), np.array([1 + s % 2])) for s, p in prompts.items()]
            out.append(pool.forward_rows(rows, mask=mask))
        results.append((out, [pool.read_kv(s) for s in prompts]))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_realign_gives_the_cache_a_re_prefill_of_the_text_would_hold(qwen2_model):
    """A generated reply (cut at a limit, its last token unfed; the toy model's tokens are not how its text
    tokenizes again) against the same text fed again: realign keeps the common prefix and feeds the rest,
    so both sessions hold the same tokens and reply alike. Where the difference lies in an evicted turn
    nothing can be kept (None) and the engine re-prefills."""
    live = qwen2_model.session(max_new_tokens=7)
    live.send("你好")
    held_before = live.kv_tokens
    kept = live.realign()
    fresh = qwen2_model.session(max_new_tokens=7)
    fresh.add_turn(live.history[0]["user"], live.history[0]["reply"])
    assert kept is not None and 0 < kept <= held_before
    np.testing.assert_array_equal(live.ledger.ids, fresh.ledger.ids)
    np.testing.assert_array_equal(live.ledger.positions, fresh.ledger.positions)
    assert live.send("谢谢").text == fresh.send("谢谢").text

    windowed = qwen2_model.session(max_new_tokens=7, window=1)
    for message in ("你好", "我想退货", "运费多少"):
        windowed.send(message)
    assert windowed.realign() is None  # turn 1's reply differs, and turn 1 is evicted


def test_a_request_waiting_when_the_engine_closes_is_told_so(qwen2_model):
    engine = BatchEngine(qwen2_model, EngineConfig(max_batch=1, max_queue=1, kv_tokens=256))
    first = engine.submit(_messages([], "你好"), max_tokens=10_000)
    first.start()  # holds the only slot
    waiting = engine.submit(_messages([], "hi"), max_tokens=5)
    errors = []

    def wait():
        try:
            waiting.start()
        except EngineClosedError as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    closer = threading.Thread(target=engine.close, kwargs={"timeout": 0.1})
    closer.start()
    t.join(10)
    first.close()
    closer.join(10)
    assert errors and waiting.finish_reason == "error" and not closer.is_alive()
