"""ChatSession over the torch backend: prefix reuse, eviction, context shift, stops, interrupts, save/restore.

The strongest check: whatever the session did (evict, roll back, resume after an interrupt), the logits it
returned for its last token equal one plain forward pass over the dialogue it claims to hold, under the mask.
"""
import numpy as np
import pytest
import torch

from belle_edge import load
from belle_edge.errors import ContextFullError, InputError, SessionFileError
from belle_edge.runtime.sampler import SamplingConfig

MESSAGES = ["你好", "订单已经发货了吗？", "Hello! How can I help you?", "请提供您的订单号。", "谢谢你的帮助！",
            "The capital of France is Paris.", "七天无理由退货。", "快递单号是多少？"]


class Recording:
    """Wraps a real backend and writes down what it was asked to run (by absolute position)."""

    def __init__(self, inner, fail_on_call=None):
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0
        self.tokens = {}  # position -> (token id, turn), latest write wins (rolled-back slots get rewritten)
        self.last = None  # (position, logits) of the last forward

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, ids, positions, turns, **kw):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # as Ctrl-C inside a backend call
        out = self.inner.forward(ids, positions, turns, **kw)
        for i, p, t in zip(ids, positions, turns):
            self.tokens[int(p)] = (int(i), int(t))
        self.last = (int(positions[-1]), out)
        return out


def recorded(session, **kw):
    session.backend = Recording(session.backend, **kw)
    return session.backend


def assert_cache_equals_full_forward(session):
    rec = session.backend
    pos = np.array(sorted(p for p in rec.tokens if p <= rec.last[0]))
    ids = np.array([rec.tokens[p][0] for p in pos])
    turns = np.array([rec.tokens[p][1] for p in pos])
    assert (pos == np.arange(len(pos))).all()
    with torch.no_grad():
        full = rec.inner.decoder(torch.from_numpy(ids)[None], pos, turns, session.mask)[0, -1].numpy()
    np.testing.assert_allclose(rec.last[1], full, atol=2e-4)


@pytest.fixture
def model(tiny_llama_model):
    return tiny_llama_model


def test_a_new_turn_prefills_only_its_new_tokens(model):
    s = model.session(max_new_tokens=6)
    s.send(MESSAGES[0])
    held = s.kv_tokens
    pending = s._pending
    s.send(MESSAGES[1])
    enc = model.tokenizer.encode
    expected = len(enc(pending, add_special_tokens=False).ids) + \
        len(enc(model.chat_format.turn_text(MESSAGES[1]), add_special_tokens=False).ids)
    assert s.stats[1].prompt_tokens == expected
    assert s.stats[1].prompt_tokens < held + expected  # the earlier turns were not prefilled again


def test_the_cached_dialogue_equals_one_full_forward_under_the_mask(model):
    s = model.session(system="你是客服。", window=1, sinks=2, max_new_tokens=5)
    recorded(s)
    for m in MESSAGES[:6]:
        s.send(m)
        assert_cache_equals_full_forward(s)
    assert sum(st.evicted_tokens for st in s.stats) > 0


def test_kv_memory_stays_bounded_with_the_window_and_grows_without(model):
    on = model.session(window=1, sinks=2, max_new_tokens=4)
    off = model.session(window=None, max_new_tokens=4)
    held_on, held_off, turn_sizes = [], [], []
    for m in MESSAGES * 2:
        before = on.kv_tokens
        on.send(m)
        off.send(m)
        held_on.append(on.kv_tokens)
        held_off.append(off.kv_tokens)
        turn_sizes.append(on.kv_tokens - before + on.last_stats.evicted_tokens)
    assert held_off == sorted(held_off) and held_off[-1] > 3 * max(held_on)
    # sinks + system (none here) + the last W+1 = 2 turns (+ the close of the previous reply)
    assert max(held_on) <= 2 + 3 * max(turn_sizes)


def test_context_shift_keeps_the_dialogue_going_past_the_position_limit(tiny_llama_dir):
    small = load(tiny_llama_dir, max_positions=80)
    s = small.session(window=1, sinks=2, max_new_tokens=6)
    for m in MESSAGES:
        s.send(m)
        assert s.ledger.positions.max() < 80
    assert any(st.context_shift for st in s.stats)
    assert len(s.history) == len(MESSAGES)


def test_a_message_longer_than_the_context_is_refused_and_the_session_stays_usable(model):
    s = model.session(max_kv_tokens=64, max_new_tokens=4)
    s.send(MESSAGES[0])
    held, history = s.kv_tokens, list(s.history)
    with pytest.raises(InputError, match="message too long: the turn is \\d+ tokens"):
        s.stream("订单已经发货了，预计三天内送达。" * 10)
    assert s.kv_tokens == held and s.history == history
    s.send(MESSAGES[1])
    assert len(s.history) == 2


def test_with_the_window_off_a_full_context_is_refused_not_truncated(model):
    s = model.session(window=None, max_kv_tokens=90, max_new_tokens=8)
    with pytest.raises(ContextFullError, match="window off keeps every turn"):
        for m in MESSAGES:
            s.send(m)
    held = s.kv_tokens
    assert held <= 90
    s.reset()
    assert s.kv_tokens == 0 and s.send(MESSAGES[0]).stats.turn == 1


def test_an_empty_message_is_refused(model):
    with pytest.raises(InputError, match="message is empty"):
        model.session().stream("   ")


def test_a_closed_stream_keeps_the_reply_so_far_and_the_session_consistent(model):
    s = model.session(window=1, sinks=2, max_new_tokens=20)
    recorded(s)
    s.send(MESSAGES[0])
    stream = s.stream(MESSAGES[1])
    first = next(stream)
    stream.close()
    assert s.last_stats.finish_reason == "interrupted"
    assert s.history[-1]["reply"].startswith(first)
    s.send(MESSAGES[2])
    assert_cache_equals_full_forward(s)


def test_stop_reply_settles_a_half_read_stream_at_once(model):
    """Ctrl-C that lands in the app's own code (printing a piece) leaves the generator suspended; stop_reply
    records the turn right away, as /stats in the CLI expects."""
    s = model.session(window=1, sinks=2, max_new_tokens=20)
    recorded(s)
    s.send(MESSAGES[0])
    stream = s.stream(MESSAGES[1])
    first = next(stream)
    assert len(s.stats) == 1  # the reply is still in flight
    s.stop_reply()
    assert len(s.stats) == 2 and s.last_stats.finish_reason == "interrupted"
    assert s.history[-1]["reply"].startswith(first)
    s.stop_reply()  # nothing in flight: nothing happens
    assert len(s.stats) == 2
    s.send(MESSAGES[2])
    assert_cache_equals_full_forward(s)


@pytest.mark.parametrize("fail_on_call", [2, 5])  # during the prefill of turn 2 / during its decoding
def test_ctrl_c_inside_the_backend_leaves_the_session_usable(model, fail_on_call):
    s = model.session(window=1, sinks=2, max_new_tokens=5)
    rec = recorded(s, fail_on_call=None)
    s.send(MESSAGES[0])
    rec.fail_on_call = rec.calls + fail_on_call - 1
    with pytest.raises(KeyboardInterrupt):
        s.send(MESSAGES[1])
    turns_after_interrupt = s.turn
    s.send(MESSAGES[2])
    assert s.turn == turns_after_interrupt + 1
    assert_cache_equals_full_forward(s)


def test_a_stop_string_cuts_the_reply_and_the_cache(model):
    for m in MESSAGES:
        reply = model.session(max_new_tokens=24).send(m).text
        if len(reply.strip()) >= 10:
            break
    else:
        pytest.fail("the tiny model wrote no reply long enough to cut")
    stop = reply[5:8]
    cut = reply.find(stop)
    s = model.session(max_new_tokens=24, stop=(stop,))
    recorded(s)
    got = s.send(m)
    assert got.text == reply[:cut].rstrip() and got.stats.finish_reason == "stop"
    s.send(MESSAGES[1])  # the cache was rolled back to before the stop string: the next turn builds on that
    assert_cache_equals_full_forward(s)


def test_save_and_restore_continue_exactly(model, tmp_path):
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=3)
    s = model.session(system="你是客服。", window=1, sinks=2, sampling=sampling, max_new_tokens=6)
    for m in MESSAGES[:3]:
        s.send(m)
    path = str(tmp_path / "s.npz")
    s.save(path)
    expected = s.send(MESSAGES[3])
    restored = model.restore(path)
    assert restored.history == s.history[:3]
    got = restored.send(MESSAGES[3])
    assert got.text == expected.text and got.stats.kv_tokens == expected.stats.kv_tokens


def test_restore_refuses_a_file_from_another_model_or_no_session_file(model, tiny_bloom_dir, tmp_path):
    path = str(tmp_path / "s.npz")
    s = model.session(max_new_tokens=3)
    s.send(MESSAGES[0])
    s.save(path)
    with pytest.raises(SessionFileError, match="saved from another model"):
        load(tiny_bloom_dir).restore(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(SessionFileError, match="not a readable belle_edge session file"):
        model.restore(str(junk))


def test_bloom_sessions_use_the_belle_format_and_its_stops(tiny_bloom_dir):
    m = load(tiny_bloom_dir)
    s = m.session(window=1, sinks=2, max_new_tokens=5)
    recorded(s)
    for msg in MESSAGES[:4]:
        s.send(msg)
    assert_cache_equals_full_forward(s)
    assert "Human:" in s._stops


@pytest.mark.slow
def test_smollm2_chats_in_english_and_chinese(smollm2_model):
    s = smollm2_model.session(max_new_tokens=24)
    first = s.send("What is the capital of France?")
    assert "Paris" in first.text and first.stats.finish_reason == "eos"
    second = s.send("请用中文说你好。")
    assert second.text.strip() and "\ufffd" not in second.text
    assert second.stats.prompt_tokens < second.stats.kv_tokens
    assert second.stats.ttft_ms > 0 and second.stats.decode_tok_s > 0


def test_ctrl_c_in_the_first_prefill_does_not_feed_the_system_prompt_twice(model):
    s = model.session(system="你是客服。", max_new_tokens=4)
    rec = recorded(s, fail_on_call=2)  # call 1: the system segment, call 2: the first message
    with pytest.raises(KeyboardInterrupt):
        s.send(MESSAGES[0])
    rec.fail_on_call = None
    s.send(MESSAGES[0])
    text = model.tokenizer.decode(s.ledger.ids.tolist(), skip_special_tokens=False)
    assert text.count("你是客服。") == 1


class FailingKeep:
    """A real backend whose next compaction is interrupted after the first layer."""

    def __init__(self, inner):
        self.inner, self.armed = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def keep(self, slots):
        if self.armed:
            self.armed = False
            first = self.inner.caches[0]
            first.keep(torch.as_tensor(slots))  # one layer compacted, the others not
            raise KeyboardInterrupt
        return self.inner.keep(slots)


def test_an_interrupted_eviction_is_repaired_on_the_next_turn(model):
    twin = model.session(window=1, sinks=2, max_new_tokens=5)
    s = model.session(window=1, sinks=2, max_new_tokens=5)
    s.backend = FailingKeep(s.backend)
    for m in MESSAGES[:2]:
        s.send(m)
        twin.send(m)
    s.backend.armed = True
    with pytest.raises(KeyboardInterrupt):
        s.send(MESSAGES[2])
    assert s._valid == 0  # the backend's cache is known to be stale
    assert s.send(MESSAGES[2]).text == twin.send(MESSAGES[2]).text
    assert s.ledger.n == twin.ledger.n and s._valid == s.ledger.n
    for a, b in ((s.ledger.ids, twin.ledger.ids), (s.ledger.positions, twin.ledger.positions),
                 (s.ledger.turns, twin.ledger.turns)):
        assert (a == b).all()
    # the repair re-prefilled the stale cache before evicting, so it holds what the uninterrupted twin holds
    # (keys computed while the now-evicted turns were still visible, as the twin's were): one more token
    # through each gives the same logits
    for session in (s, twin):
        session._sync()  # a settled reply may have rolled back tokens a backend still holds
        assert session.backend.n == session.ledger.n
    token, position = int(s.ledger.ids[-1]), s.ledger.next_position
    got, want = (session.backend.forward(np.array([token]), np.array([position]), np.array([s.turn]), mask=s.mask)
                 for session in (s, twin))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_an_interrupted_context_shift_keeps_every_token_and_completes_later(model):
    s = model.session(window=1, sinks=2, max_new_tokens=6)
    s.prefill_chunk = 8
    rec = recorded(s)
    for m in MESSAGES[:4]:
        s.send(m)
    ids = s.ledger.ids.copy()
    rec.fail_on_call = rec.calls + 2  # inside the re-prefill, after its first chunk
    with pytest.raises(KeyboardInterrupt):
        s._context_shift()
    assert (s.ledger.ids == ids).all() and (s.ledger.positions == np.arange(len(ids))).all()
    assert 0 < s._valid < s.ledger.n
    rec.fail_on_call = None
    s.send(MESSAGES[4])  # finishes the shift first, then the turn
    assert s._valid == s.ledger.n
    assert_cache_equals_full_forward(s)  # a (finished) shift is a full re-prefill at the new positions


def test_reset_while_a_reply_streams_leaves_the_new_dialogue_alone(model):
    s = model.session(max_new_tokens=20)
    stream = s.stream(MESSAGES[0])
    next(stream)
    s.reset()
    reply = s.send(MESSAGES[1])
    stream.close()
    assert [h["user"] for h in s.history] == [MESSAGES[1]] and s.history[0]["reply"] == reply.text
    assert len(s.stats) == 1


def test_a_damaged_session_file_is_refused(model, tmp_path):
    s = model.session(max_new_tokens=3)
    s.send(MESSAGES[0])
    path = tmp_path / "s.npz"
    s.save(str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SessionFileError, match="not a readable belle_edge session file"):
        model.restore(str(path))
