"""Fuzzing the weight-file readers (issue "nothing breaks: fuzzing every input").

The rule: each reader either works or raises a ``BelleEdgeError`` subclass whose message is one line naming
the file: no other exception, no hang, no allocation beyond a bound. Small valid files are built once (a tiny
LLaMA as safetensors, one-file and sharded, and as a GGUF written by ``gguf.GGUFWriter``, a torch pickle) and
then cut at every offset, bit-flipped, given huge length fields, or replaced by headers that hypothesis draws.

Bounds per case (:func:`run_case`): ``CASE_SECONDS`` of wall time (SIGALRM breaks a hang), a Python-heap peak of
``PEAK_BYTES`` (tracemalloc sees Python and numpy allocations) and a resident-memory peak of ``RSS_BYTES`` above
the case's start (the kernel's VmHWM, reset per case: that sees torch's and the Rust safetensors reader's
allocations too).
Each example also has hypothesis's ``deadline``.

The seed is fixed (``derandomize=True``, no example database), so a run is repeatable. For a longer run by hand,
``BELLE_EDGE_FUZZ_EXAMPLES=10`` multiplies every example count (and the share of offsets the sweeps visit)
by 10.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import struct
import tracemalloc
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from belle_edge.errors import BelleEdgeError, CheckpointError

SCALE = max(1, int(os.environ.get("BELLE_EDGE_FUZZ_EXAMPLES", "1")))
CASE_SECONDS = 20  # a case still running after this is a hang
PEAK_BYTES = 64 * 2**20  # Python/numpy heap peak per case
RSS_BYTES = 256 * 2**20  # resident-memory peak per case, above the RSS at its start
HUGE = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def fuzz_settings(examples: int, deadline_s: float = 2.0):
    return settings(max_examples=examples * SCALE, derandomize=True, database=None,
                    deadline=timedelta(seconds=deadline_s), print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------- the bounds
class Hang(BaseException):
    """Raised by the alarm: a BaseException, so a reader's ``except Exception`` cannot turn it into an error."""


def _alarm(signum, frame):
    raise Hang(f"a case ran past {CASE_SECONDS} s")


class Bounds:
    """What the bounds keep across cases: a count of them and the largest resident-memory peak seen."""

    def __init__(self):
        self.cases = collections.Counter()  # reader -> cases run
        self.worst_rss = 0


def _status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process in bytes (None where /proc is not Linux's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark (VmHWM; "5" to clear_refs, Linux >= 4.0) and return the RSS now: after
    the case, VmHWM minus this is the case's own peak, whoever allocated (torch, the Rust safetensors reader)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


@pytest.fixture(scope="module")
def bounds(readers_warm):
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    b = Bounds()
    yield b
    signal.signal(signal.SIGALRM, old_handler)
    print(f"\nfuzz_weights: {sum(b.cases.values())} cases {dict(b.cases)}, largest resident-memory peak of one "
          f"case {b.worst_rss / 2**20:.0f} MiB")


def run_case(bounds: Bounds, read, *args, names: str | None = None, **kwargs):
    """``read(*args, **kwargs)`` under the bounds: returns what it returned or the BelleEdgeError it raised;
    any other exception, a hang or an allocation past a bound fails the test. ``names``: a string the error
    message must contain (the file or folder it is about)."""
    bounds.cases[read.__name__] += 1
    tracemalloc.start()  # per case: tracing hypothesis's own drawing too made it 5 times slower
    rss = _reset_peak_rss()
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        return read(*args, **kwargs)
    except BelleEdgeError as e:
        message = str(e)
        assert "\n" not in message, f"not one line: {message!r}"
        assert names is None or names in message, f"the message does not name {names!r}: {message!r}"
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f"a case allocated {peak / 2**20:.0f} MiB on the Python heap"
        if rss is not None:
            rise = _status_bytes("VmHWM") - rss
            bounds.worst_rss = max(bounds.worst_rss, rise)
            assert rise < RSS_BYTES, f"a case's resident memory peaked {rise / 2**20:.0f} MiB above its start"


# ------------------------------------------------------------------------------------------- valid files
@pytest.fixture(scope="module")
def cache_off():
    """No GGUF conversion cache: it is keyed by path, size and mtime, and a mutated file of the same size
    written within the mtime's granularity would be served the previous case's conversion."""
    old = os.environ.get("BELLE_EDGE_CACHE")
    os.environ["BELLE_EDGE_CACHE"] = "off"
    yield
    if old is None:
        os.environ.pop("BELLE_EDGE_CACHE", None)
    else:
        os.environ["BELLE_EDGE_CACHE"] = old


@pytest.fixture(scope="module")
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(old)
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_weights")


@pytest.fixture(scope="module")
def llama_dir(work, tiny_tokenizer):
    """A 1-layer LLaMA (hidden 16, tied head) as a Hugging Face folder: model.safetensors is 29 KB."""
    from conftest import make_tiny_llama

    path = work / "llama"
    make_tiny_llama(str(path), tiny_tokenizer, layers=1, hidden=16, intermediate=32, tie=True)
    os.remove(path / "generation_config.json")
    return path


def _gguf_vocab(tokenizer, size: int):
    """About ``size`` tokens of a byte-level BPE tokenizer (its specials, the first bytes, and what its first
    merges need) and those merges: gguf's reader makes objects per token, so a small vocabulary keeps each case
    fast (transformers wants some merges to build the tokenizer)."""
    model = json.loads(tokenizer.to_str())["model"]
    order = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]][:8]
    wanted = set(order[:size]) | {t for a, b in merges for t in (a, b, a + b)}
    return [t for t in order if t in wanted], [" ".join(m) for m in merges]


def make_gguf(path, tokenizer, *, layers=1, hidden=32, ff=64, heads=2, kv_heads=1, vocab=64, seed=0):
    """A tiny LLaMA GGUF with a gpt2 (byte-level BPE) tokenizer, Q8_0 embedding and MLP, F16 attention."""
    import gguf
    from gguf.quants import quantize

    tokens, merges = _gguf_vocab(tokenizer, vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    rng = np.random.default_rng(seed)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def add_q8(name, x):
        w.add_tensor(name, quantize(x, q8), raw_dtype=q8)

    add_q8("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    kv = kv_heads * hidden // heads
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        for name, rows in (("attn_q", hidden), ("attn_k", kv), ("attn_v", kv), ("attn_output", hidden)):
            w.add_tensor(p + name + ".weight", rand(rows, hidden).astype(np.float16))
        add_q8(p + "ffn_gate.weight", rand(ff, hidden))
        add_q8(p + "ffn_up.weight", rand(ff, hidden))
        add_q8(p + "ffn_down.weight", rand(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(work, tiny_tokenizer):
    return make_gguf(work / "tiny.gguf", tiny_tokenizer)


@pytest.fixture(scope="module")
def readers_warm(cache_off, quiet_transformers, llama_dir, gguf_file):
    """Every reader once on its valid file before any bound is measured: the first call imports transformers
    and torch's pieces (seconds, and memory that is not a case's)."""
    from belle_edge.core.gguf import read_gguf, read_gguf_config
    from belle_edge.core.load import load_checkpoint

    assert load_checkpoint(str(llama_dir)).config.num_layers == 1
    assert read_gguf_config(str(gguf_file)).hidden_size == 32
    assert read_gguf(str(gguf_file)).config.num_layers == 1


def _copy_dir(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _flip(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for offset, bit in flips:
        out[offset % len(out)] ^= 1 << bit
    return bytes(out)


def _sweep(n: int, dense: int) -> list[int]:
    """Offsets to cut a file of n bytes at: every one of the first ``dense`` (the header, where each cut
    is a different case), then every 64th (``BELLE_EDGE_FUZZ_EXAMPLES`` makes it denser) and the last 64."""
    stride = max(1, 64 // SCALE)
    return sorted(set(range(min(dense, n))) | set(range(dense, n, stride)) | set(range(max(0, n - 64), n)))


# ------------------------------------------------------------------------------------------- safetensors
def _load(bounds, folder, **kw):
    from belle_edge.core.load import load_checkpoint

    result = run_case(bounds, load_checkpoint, str(folder), names=os.path.basename(str(folder)), **kw)
    if not isinstance(result, BelleEdgeError):
        _assert_usable(result.state_dict)
    return result


def _assert_usable(state: dict) -> None:
    """What a reader returns as weights becomes float32 in the decoder: without an error, and without a warning
    (complex numbers would lose their imaginary part with one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, tensor in state.items():
            assert isinstance(name, str) and isinstance(tensor, torch.Tensor), name
            tensor.to(torch.float32)


@pytest.fixture(scope="module")
def st_case(work, llama_dir):
    """A copy of the tiny LLaMA whose model.safetensors each case overwrites."""
    return _copy_dir(llama_dir, work / "st_case")


def test_fuzz_safetensors_truncated_at_every_offset(bounds, llama_dir, st_case):
    """Cut at every offset of the header and every 64th of the data: every cut must be refused."""
    data = (llama_dir / "model.safetensors").read_bytes()
    target = st_case / "model.safetensors"
    cuts = _sweep(len(data), dense=8 + struct.unpack("<Q", data[:8])[0])
    print(f"safetensors: {len(cuts)} cuts of {len(data)} bytes")  # the cases tried, for a long run's record
    for cut in cuts:
        target.write_bytes(data[:cut])
        assert isinstance(_load(bounds, st_case), CheckpointError), f"cut at {cut} of {len(data)} loaded"


@fuzz_settings(600)
@given(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), min_size=1, max_size=4),
       in_header=st.booleans())
def test_fuzz_safetensors_bit_flips(bounds, llama_dir, st_case, flips, in_header):
    data = (llama_dir / "model.safetensors").read_bytes()
    span = 8 + struct.unpack("<Q", data[:8])[0] if in_header else len(data)
    (st_case / "model.safetensors").write_bytes(_flip(data, [(o % span, b) for o, b in flips]))
    _load(bounds, st_case)


@fuzz_settings(300)
@given(length=st.sampled_from(HUGE) | st.integers(0, 2**64 - 1) | st.integers(0, 40_000))
def test_fuzz_safetensors_header_length(bounds, llama_dir, st_case, length):
    data = (llama_dir / "model.safetensors").read_bytes()
    (st_case / "model.safetensors").write_bytes(struct.pack("<Q", length) + data[8:])
    result = _load(bounds, st_case)
    assert isinstance(result, CheckpointError) or length == struct.unpack("<Q", data[:8])[0]


LLAMA_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
               "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
ST_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "I64", "I32", "I16",
             "I8", "U64", "U32", "U16", "U8", "BOOL", "C64", "F8_E4M3FNUZ"]
ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
              "U16": 2}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@st.composite
def safetensors_files(draw):
    """A safetensors file from a drawn header: mostly plausible tensor entries (LLaMA names, every dtype,
    shapes and offsets that may or may not agree with the bytes), sometimes any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        header = draw(json_values)
        data = draw(st.binary(max_size=64))
    else:
        header, end = {}, 0
        for name in draw(st.lists(st.sampled_from(LLAMA_NAMES) | st.text(max_size=6), max_size=4, unique=True)):
            dtype = draw(st.sampled_from(ST_DTYPES) | st.text(max_size=4))
            shape = draw(st.lists(st.integers(0, 6) | st.sampled_from([-1, 2**32, 2**63]), max_size=3))
            size = int(np.prod(shape, dtype=object)) * ITEM_BYTES.get(dtype, 1) if shape else ITEM_BYTES.get(dtype, 1)
            start = draw(st.sampled_from([end, 0, end + 1]) | st.integers(0, 2**64 - 1))
            stop = draw(st.sampled_from([start + size, start + size + 1, start]) | st.integers(0, 2**64 - 1))
            entry = {"dtype": dtype, "shape": shape, "data_offsets": [start, stop]}
            if draw(st.integers(0, 9)) == 0:
                entry = draw(st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), json_values))
            header[name] = entry
            end = max(end, stop if isinstance(stop, int) and stop < 2**20 else end)
        if draw(st.booleans()):
            header["__metadata__"] = draw(json_values)
        data = draw(st.sampled_from([b"\x00" * min(end, 4096), b"\x3c" * min(end, 4096)]) | st.binary(max_size=64))
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@fuzz_settings(800)
@given(raw=safetensors_files())
def test_fuzz_safetensors_drawn_headers(bounds, st_case, raw):
    (st_case / "model.safetensors").write_bytes(raw)
    _load(bounds, st_case)


@fuzz_settings(800)
@given(raw=safetensors_files())
def test_fuzz_safetensors_drawn_headers_read_weights(bounds, work, raw):
    from belle_edge.core.hf_dir import _read_weights

    folder = work / "weights_only"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(raw)
    result = run_case(bounds, _read_weights, str(folder), allow_pickle=False, names="model.safetensors")
    if not isinstance(result, BelleEdgeError):
        _assert_usable(result)


# ------------------------------------------------------------------------------------------- sharded
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(work, llama_dir):
    """The tiny LLaMA in 3 shards with a correct index: the base each sharded case starts from."""
    from safetensors.torch import load_file, save_file

    folder = _copy_dir(llama_dir, work / "sharded_base")
    state = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    names = sorted(state)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": names[i::3] for i in range(3)}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder, weight_map, state


SHARD_NAMES = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors", "model-00004-of-00003.safetensors", "../model.safetensors",
               "../sharded_base/model-00001-of-00003.safetensors", "/etc/passwd", "sub/x.safetensors", "", ".", "..",
               "nul\x00.safetensors", "config.json", "tokenizer.json"]


@st.composite
def indexes(draw, weight_map):
    """An index for the 3 shards: the right one with a few entries changed (other shards, missing ones, paths
    outside the folder, dropped or added tensors), or any JSON."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_values)
    wm = dict(weight_map)
    for name in draw(st.lists(st.sampled_from(sorted(wm)), max_size=3, unique=True)):
        action = draw(st.sampled_from(["move", "drop", "value"]))
        if action == "move":
            wm[name] = draw(st.sampled_from(SHARD_NAMES) | st.text(max_size=8))
        elif action == "drop":
            del wm[name]
        else:
            wm[name] = draw(json_values)
    if draw(st.integers(0, 4)) == 0:
        wm[draw(st.text(max_size=8))] = draw(st.sampled_from(SHARD_NAMES))
    if kind == 1:
        return {"weight_map": draw(json_values)}
    if kind == 2:
        return {"metadata": {}}
    return {"metadata": draw(json_values), "weight_map": wm}


@fuzz_settings(1000)
@given(data=st.data(), duplicate=st.booleans(), stray=st.booleans())
def test_fuzz_sharded_index(bounds, work, sharded, data, duplicate, stray):
    from safetensors.torch import save_file

    base, weight_map, state = sharded
    folder = work / "sharded_case"
    if not folder.exists():
        _copy_dir(base, folder)
    index = data.draw(indexes(weight_map))
    (folder / INDEX).write_text(json.dumps(index))
    # a tensor that is also in another shard: the state must not depend on which shard is read last
    shard2 = folder / "model-00002-of-00003.safetensors"
    keys2 = [k for k, s in weight_map.items() if s == shard2.name]
    extra = sorted(set(weight_map) - set(keys2))[0]
    save_file({k: state[k] for k in keys2 + ([extra] if duplicate else [])}, str(shard2))
    stray_file = folder / "stray.safetensors"  # a file the index does not name (sorted last: read last, if read)
    if stray:
        save_file({extra: state[extra] * 2}, str(stray_file))
    elif stray_file.exists():
        os.remove(stray_file)
    result = _load(bounds, folder)
    if not isinstance(result, BelleEdgeError):  # what it read is the tiny LLaMA, every tensor and nothing else
        from belle_edge.models import llama

        expected = llama.state_dict_from_hf(state, result.config, where="expected")
        assert sorted(result.state_dict) == sorted(expected) and not duplicate
        assert all(torch.equal(result.state_dict[k], expected[k]) for k in expected)


def test_a_correct_index_loads(bounds, sharded):
    base, weight_map, state = sharded
    ckpt = _load(bounds, base)
    assert torch.equal(ckpt.state_dict["layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"])


# ------------------------------------------------------------------------------------------- JSON files
json_texts = st.one_of(
    st.binary(max_size=64),
    json_values.map(json.dumps).map(str.encode),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(1, 100_000).map(lambda n: b'{"a": ' + b"[" * n),
    st.integers(4000, 5000).map(lambda n: b'{"a": ' + b"7" * n + b"}"),  # past Python's int digit limit
    st.sampled_from([b"\xef\xbb\xbf{}", b"{}\x00", b'{"a": NaN}', b'{"a": 1e999}', b"\xff\xfe{\x00}\x00"]),
)


@fuzz_settings(1500)
@given(raw=json_texts)
def test_fuzz_read_json(bounds, work, raw):
    from belle_edge.core.hf_dir import read_json

    path = work / "some.json"
    path.write_bytes(raw)
    result = run_case(bounds, read_json, str(path), names="some.json")
    assert isinstance(result, (dict, CheckpointError))


@fuzz_settings(1000)
@given(raw=json_texts, which=st.sampled_from(["config.json", INDEX]))
def test_fuzz_json_files_of_a_checkpoint(bounds, work, sharded, raw, which):
    folder = work / "json_case"
    if not folder.exists():
        _copy_dir(sharded[0], folder)
        shutil.copy(sharded[0] / "config.json", work / "config.json.good")
        shutil.copy(sharded[0] / INDEX, work / "index.good")
    shutil.copy(work / "config.json.good", folder / "config.json")
    shutil.copy(work / "index.good", folder / INDEX)
    (folder / which).write_bytes(raw)
    _load(bounds, folder)


@st.composite
def quantized_records(draw):
    model = {"family": "llama", "vocab_size": 400, "hidden_size": 16, "num_layers": 1, "num_heads": 4,
             "num_kv_heads": 2, "head_dim": 4, "intermediate_size": 32, "max_positions": 512, "norm_eps": 1e-6,
             "norm": "rms", "mlp": "swiglu", "positions": "rope", "eos_token_ids": [2]}
    for key in draw(st.lists(st.sampled_from(sorted(model) + ["bogus"]), max_size=3)):
        model[key] = draw(json_values)
    record = {"format": "belle_edge.quantized", "version": 1, "model": model}
    return draw(st.sampled_from([record, {"model": draw(json_values)}, draw(json_values)]))


@fuzz_settings(800)
@given(record=quantized_records())
def test_fuzz_load_config_of_a_quantized_record(bounds, work, record):
    from belle_edge.core.load import load_config

    folder = work / "quantized_case"
    folder.mkdir(exist_ok=True)
    (folder / "quantization.json").write_text(json.dumps(record))
    run_case(bounds, load_config, str(folder), names="quantization.json")


# ------------------------------------------------------------------------------------------- torch pickle
@pytest.fixture(scope="module")
def bin_case(work, llama_dir):
    from safetensors.torch import load_file

    folder = _copy_dir(llama_dir, work / "bin_case")
    state = load_file(str(folder / "model.safetensors"))
    os.remove(folder / "model.safetensors")
    good = work / "pytorch_model.bin.good"
    torch.save({k: state[k] for k in sorted(state)[:3]}, str(good))
    return folder, good.read_bytes()


def test_fuzz_pickle_weights_truncated_at_every_offset(bounds, bin_case):
    """Cut at every 16th offset (every one with ``BELLE_EDGE_FUZZ_EXAMPLES`` >= 16): every cut must be refused."""
    from belle_edge.core.hf_dir import _read_weights

    folder, data = bin_case
    step = max(1, 16 // SCALE)  # a zip of 3 tensors: its directory sits at the end, so every cut breaks it
    print(f"pickle weights: {len(range(0, len(data), step))} cuts of {len(data)} bytes")
    for cut in range(0, len(data), step):
        (folder / "pytorch_model.bin").write_bytes(data[:cut])
        result = run_case(bounds, _read_weights, str(folder), allow_pickle=True, names="pytorch_model.bin")
        assert isinstance(result, CheckpointError), f"cut at {cut} of {len(data)} loaded"


@fuzz_settings(1000)
@given(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), min_size=1, max_size=4))
def test_fuzz_pickle_weights_bit_flips(bounds, bin_case, flips):
    from belle_edge.core.hf_dir import _read_weights

    folder, data = bin_case
    (folder / "pytorch_model.bin").write_bytes(_flip(data, flips))
    result = run_case(bounds, _read_weights, str(folder), allow_pickle=True, names="pytorch_model.bin")
    if not isinstance(result, BelleEdgeError):
        _assert_usable(result)


pickled_values = st.recursive(
    json_values | st.builds(lambda n, d: torch.zeros(n, dtype=d), st.integers(0, 4),
                            st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool, torch.complex64])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=6)


@fuzz_settings(600)
@given(value=pickled_values)
def test_fuzz_pickle_weights_drawn_objects(bounds, bin_case, value):
    """A well-formed pickle of something other than a dict of tensors (what torch.save was given)."""
    from belle_edge.core.hf_dir import _read_weights

    folder, _ = bin_case
    torch.save(value, str(folder / "pytorch_model.bin"))
    result = run_case(bounds, _read_weights, str(folder), allow_pickle=True, names="pytorch_model.bin")
    if not isinstance(result, BelleEdgeError):
        _assert_usable(result)


# ------------------------------------------------------------------------------------------- GGUF
def _gguf_read(bounds, path, full=True):
    from belle_edge.core.gguf import read_gguf, read_gguf_config

    return run_case(bounds, read_gguf if full else read_gguf_config, str(path), names=os.path.basename(str(path)))


@pytest.fixture(scope="module")
def gguf_fields(gguf_file):
    return _gguf_fields(gguf_file)


def _gguf_fields(path) -> list[tuple[str, list[tuple[int, int]]]]:
    """Every field of a valid GGUF as (name, [(offset, bytes) of each part]): the counts; each key's length,
    bytes and type and its value (a string's length and bytes, an array's item type, length and items); each
    tensor's name, dims, type and offset. gguf's own reader finds them: its parts are views into the file's
    memory map."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    base = reader.data.ctypes.data
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    return [(f.name, [(p.ctypes.data - base, int(p.nbytes)) for p in f.parts if p.nbytes]) for f in fields]


def test_fuzz_gguf_truncated_at_every_offset(bounds, work, gguf_file):
    """Cut at every offset of the header and every 64th of the tensor data, loaded in full: every cut before
    the last tensor's end must be refused."""
    from gguf import GGUFReader

    data = gguf_file.read_bytes()
    reader = GGUFReader(str(gguf_file))
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    target = work / "cut.gguf"
    cuts = _sweep(len(data), dense=reader.data_offset)
    print(f"gguf: {len(cuts)} cuts of {len(data)} bytes")
    for cut in cuts:
        target.write_bytes(data[:cut])
        result = _gguf_read(bounds, target)
        assert isinstance(result, CheckpointError) or cut >= data_end, f"cut at {cut} of {len(data)} loaded"


@st.composite
def gguf_overwrites(draw, fields, size):
    """A part of a field of the valid GGUF overwritten (the field drawn first, so the vocabulary's thousand
    parts do not crowd out the rest): numbers with huge, boundary or any values, bytes with any."""
    _, parts = draw(st.sampled_from(fields))
    offset, nbytes = draw(st.sampled_from(parts))
    if nbytes in (1, 2, 4, 8):
        limit = 2 ** (8 * nbytes) - 1
        # small and boundary values, sizes (a block count of 100,000 is no overflow but a model of gigabytes),
        # huge values, any value
        value = draw(st.sampled_from([0, 1, 2, 3, 7, 8, 9, 12, 13, size, size + 1]) | st.sampled_from(HUGE)
                     | st.sampled_from([1000, 100_000, 10**6]) | st.integers(0, limit)) & limit
        return offset, value.to_bytes(nbytes, "little")
    return offset, draw(st.binary(min_size=nbytes, max_size=nbytes))


def _overwrite(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


# the whole load (read_gguf) in a quarter of the cases, the config alone in the rest: a mutated file that is still
# valid takes transformers ~150 ms to load in full, ~40 ms to read the config of
one_in_four = st.sampled_from([True, False, False, False])


@fuzz_settings(800, deadline_s=3.0)
@given(data=st.data(), full=one_in_four)
def test_fuzz_gguf_field_overwrites(bounds, work, gguf_file, gguf_fields, data, full):
    raw = gguf_file.read_bytes()
    offset, new = data.draw(gguf_overwrites(gguf_fields, len(raw)))
    target = work / "field.gguf"
    target.write_bytes(_overwrite(raw, offset, new))
    _gguf_read(bounds, target, full=full)


@fuzz_settings(400, deadline_s=3.0)
@given(flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), min_size=1, max_size=4),
       full=one_in_four)
def test_fuzz_gguf_bit_flips_in_the_header(bounds, work, gguf_file, flips, full):
    from gguf import GGUFReader

    raw = gguf_file.read_bytes()
    header = GGUFReader(str(gguf_file)).data_offset  # flips in tensor data make valid files: slow, and dull
    target = work / "flip.gguf"
    target.write_bytes(_flip(raw[:header], flips) + raw[header:])
    _gguf_read(bounds, target, full=full)


@st.composite
def gguf_headers(draw):
    """A GGUF header from scratch: magic, version, counts (huge ones too), then drawn key/value records."""
    version = draw(st.sampled_from([2, 3]) | st.integers(0, 2**32 - 1))
    n_tensors = draw(st.sampled_from([0, 1, 2]) | st.sampled_from(HUGE))
    records = []
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from([b"general.architecture", b"llama.block_count", b"general.alignment"])
                   | st.binary(max_size=6))
        klen = draw(st.just(len(key)) | st.sampled_from(HUGE))
        vtype = draw(st.integers(0, 13))
        value = draw(st.binary(max_size=24)) if vtype != 8 else _string(draw)
        if vtype == 9:  # an array: item type, a count (huge ones too), items
            value = struct.pack("<IQ", draw(st.integers(0, 13)), draw(st.integers(0, 64) | st.sampled_from(HUGE))) + value
        records.append(struct.pack("<Q", klen) + key + struct.pack("<I", vtype) + value)
    n_kv = draw(st.just(len(records)) | st.sampled_from(HUGE))
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(records) + draw(st.binary(max_size=48))


def _string(draw) -> bytes:
    text = draw(st.sampled_from([b"llama", b"qwen2", b"bloom"]) | st.binary(max_size=12))
    return struct.pack("<Q", draw(st.just(len(text)) | st.sampled_from(HUGE))) + text


@fuzz_settings(2000)
@given(raw=gguf_headers())
def test_fuzz_gguf_drawn_headers(bounds, work, raw):
    target = work / "drawn.gguf"
    target.write_bytes(raw)
    _gguf_read(bounds, target, full=False)


# ------------------------------------------------------------------------------------------- regressions
# One plain test per bug the fuzzing (or the work around it) found, named after it.
def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def test_a_line_break_in_a_safetensors_header_gives_a_one_line_error(tmp_path):
    from belle_edge.core.hf_dir import _read_weights

    header = {"model.norm.weight": {"dtype": "\n", "shape": [], "data_offsets": [0, 1]}}
    (tmp_path / "model.safetensors").write_bytes(_safetensors_bytes(header, b"\x00"))
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file") as e:
        _read_weights(str(tmp_path), allow_pickle=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["C64", "F4"])
def test_complex_and_packed_float4_tensors_are_refused(tmp_path, dtype):
    from belle_edge.core.hf_dir import _read_weights

    header = {"model.norm.weight": {"dtype": dtype, "shape": [8], "data_offsets": [0, 64 if dtype == "C64" else 4]}}
    (tmp_path / "model.safetensors").write_bytes(_safetensors_bytes(header, b"\x00" * (64 if dtype == "C64" else 4)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight': expected real numbers .*got (complex64|float4)"):
        _read_weights(str(tmp_path), allow_pickle=False)


def _sharded_copy(sharded, tmp_path):
    return _copy_dir(sharded[0], tmp_path / "ckpt")


def _edit_index(folder, **changes):
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"].update(changes)
    (folder / INDEX).write_text(json.dumps(index))


def test_a_tensor_in_two_shards_is_refused(tmp_path, sharded):
    from safetensors.torch import save_file

    from belle_edge.core.load import load_checkpoint

    folder = _sharded_copy(sharded, tmp_path)
    _, weight_map, state = sharded
    name = "model.norm.weight"
    other = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    keys = [k for k, s in weight_map.items() if s == other]
    save_file({**{k: state[k] for k in keys}, name: state[name] * 2}, str(folder / other))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight': expected it in one shard, got it in"):
        load_checkpoint(str(folder))


def test_a_tensor_in_two_shards_is_refused_without_an_index(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    from belle_edge.core.load import load_checkpoint

    folder = _copy_dir(llama_dir, tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    save_file({"model.norm.weight": state["model.norm.weight"] * 2}, str(folder / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight': expected it in one shard"):
        load_checkpoint(str(folder))


def test_an_index_naming_a_missing_shard_is_refused(tmp_path, sharded):
    from belle_edge.core.load import load_checkpoint

    folder = _sharded_copy(sharded, tmp_path)
    os.remove(folder / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match=r"index.json: field weight_map\[.*\]: shard "
                                              r"'model-00002-of-00003.safetensors' is missing"):
        load_checkpoint(str(folder))


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ""])
def test_an_index_naming_a_file_outside_the_folder_is_refused(tmp_path, sharded, shard):
    from belle_edge.core.load import load_checkpoint

    folder = _sharded_copy(sharded, tmp_path)
    shutil.copy(sharded[0].parent / "llama" / "model.safetensors", tmp_path / "model.safetensors")
    _edit_index(folder, **{"model.norm.weight": shard})
    with pytest.raises(CheckpointError, match=r"field weight_map\['model.norm.weight'\]: expected a shard file name "
                                              r"in the checkpoint folder, got str"):
        load_checkpoint(str(folder))


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path, sharded):
    from belle_edge.core.load import load_checkpoint

    folder = _sharded_copy(sharded, tmp_path)
    _, weight_map, _ = sharded
    wrong = next(s for s in sorted(set(weight_map.values())) if s != weight_map["model.norm.weight"])
    _edit_index(folder, **{"model.norm.weight": wrong})
    with pytest.raises(CheckpointError, match=r"weight_map\['model.norm.weight'\]: expected the shard holding that "
                                              r"tensor, got 'model-0000.-of-00003.safetensors', which does not hold it"):
        load_checkpoint(str(folder))
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"got no entry for 'model.norm.weight'"):
        load_checkpoint(str(folder))


def test_a_stray_safetensors_file_beside_an_index_is_not_read(tmp_path, sharded):
    from safetensors.torch import save_file

    from belle_edge.core.load import load_checkpoint

    folder = _sharded_copy(sharded, tmp_path)
    save_file({"model.norm.weight": torch.zeros(16)}, str(folder / "consolidated.safetensors"))
    ckpt = load_checkpoint(str(folder))
    assert torch.equal(ckpt.state_dict["norm.weight"], sharded[2]["model.norm.weight"])


def test_a_checkpoint_in_a_folder_with_brackets_loads(tmp_path, llama_dir, gguf_file):
    from belle_edge.core.load import load_checkpoint, load_config

    folder = _copy_dir(llama_dir, tmp_path / "tiny[int4]")
    assert load_checkpoint(str(folder)).config.num_layers == 1
    gguf_folder = tmp_path / "gguf[q8]"
    gguf_folder.mkdir()
    shutil.copy(gguf_file, gguf_folder / "tiny.gguf")
    assert load_config(str(gguf_folder)).hidden_size == 32


def test_an_empty_pickle_file_gives_a_checkpoint_error(tmp_path):
    from belle_edge.core.hf_dir import _read_weights

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a readable torch checkpoint \(EOFError\)"):
        _read_weights(str(tmp_path), allow_pickle=True)


@pytest.mark.parametrize("raw", [b"\x80\x02.", b"\x80\x02X\x02\x00\x00\x00\x80\x80."], ids=["IndexError", "UnicodeDecodeError"])
def test_a_corrupt_pickle_gives_a_checkpoint_error(tmp_path, raw):
    from belle_edge.core.hf_dir import _read_weights

    (tmp_path / "pytorch_model.bin").write_bytes(raw)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a readable torch checkpoint"):
        _read_weights(str(tmp_path), allow_pickle=True)


@pytest.mark.parametrize("value", [torch.zeros(3), [torch.zeros(3)], {1: torch.zeros(3)}, {"w": 3}],
                         ids=["tensor", "list", "int-name", "not-a-tensor"])
def test_a_pickle_of_anything_but_named_tensors_is_refused(tmp_path, value):
    from belle_edge.core.hf_dir import _read_weights

    torch.save(value, str(tmp_path / "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: .*expected (a dict|strings|a tensor)"):
        _read_weights(str(tmp_path), allow_pickle=True)


def test_a_quantized_record_error_names_the_record(tmp_path):
    from belle_edge.core.load import load_config

    (tmp_path / "quantization.json").write_text(json.dumps({"model": {"family": "llama", "bogus": 1}}))
    with pytest.raises(CheckpointError, match=r"quantization.json: field model: model config: unknown fields"):
        load_config(str(tmp_path))


def _gguf_with(src, tmp_path, offset: int, new: bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(_overwrite(src.read_bytes(), offset, new))
    return path


def _part(gguf_file, field: str, index: int) -> tuple[int, int]:
    """(offset, bytes) of part ``index`` of a field of the valid GGUF."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    part = reader.fields[field].parts[index]
    return part.ctypes.data - reader.data.ctypes.data, int(part.nbytes)


def test_a_gguf_array_claiming_2_63_items_is_refused_without_looping(tmp_path, cache_off, gguf_file):
    from belle_edge.core.gguf import read_gguf_config

    offset, size = _part(gguf_file, "tokenizer.ggml.token_type", 4)  # [klen, key, type, item type, length, ...]
    path = _gguf_with(gguf_file, tmp_path, offset, (2**63).to_bytes(size, "little"))
    with pytest.raises(CheckpointError, match=r"bad.gguf: not a usable GGUF checkpoint: metadata "
                                              r"'tokenizer.ggml.token_type' length: expected at most"):
        read_gguf_config(str(path))


def test_a_gguf_string_claiming_gigabytes_is_refused(tmp_path, cache_off, gguf_file):
    from belle_edge.core.gguf import read_gguf_config

    offset, size = _part(gguf_file, "general.architecture", 3)  # [klen, key, type, string length, string]
    path = _gguf_with(gguf_file, tmp_path, offset, (2**33).to_bytes(size, "little"))
    with pytest.raises(CheckpointError, match=r"metadata 'general.architecture': expected 8,589,934,592 bytes"):
        read_gguf_config(str(path))


def test_gguf_metadata_needing_more_parameters_than_the_file_holds_is_refused(tmp_path, cache_off, gguf_file):
    from belle_edge.core.gguf import read_gguf

    offset, size = _part(gguf_file, "llama.block_count", 3)
    path = _gguf_with(gguf_file, tmp_path, offset, (100_000).to_bytes(size, "little"))
    with pytest.raises(CheckpointError, match=r"config contradicts weights: the metadata's shapes need "
                                              r"[\d,]+ parameters, the file's tensors hold [\d,]+"):
        read_gguf(str(path))


def test_a_gguf_missing_a_tensor_is_refused(tmp_path, cache_off, tiny_tokenizer):
    import gguf

    from belle_edge.core.gguf import read_gguf

    real = gguf.GGUFWriter.add_tensor

    def misnamed(self, name, *args, **kwargs):  # as many parameters, under a name no weight has
        real(self, "blk.0.ffn_upp.weight" if name == "blk.0.ffn_up.weight" else name, *args, **kwargs)

    gguf.GGUFWriter.add_tensor = misnamed
    try:
        path = make_gguf(tmp_path / "missing.gguf", tiny_tokenizer)
    finally:
        gguf.GGUFWriter.add_tensor = real
    with pytest.raises(CheckpointError, match=r"missing.gguf: weights missing for the configured model: "
                                              r"model.layers.0.mlp.up_proj.weight"):
        read_gguf(str(path))


def test_a_gguf_named_by_a_bare_file_name_loads(tmp_path, cache_off, gguf_file, monkeypatch):
    from belle_edge.core.gguf import read_gguf, read_gguf_config

    shutil.copy(gguf_file, tmp_path / "tiny.gguf")
    monkeypatch.chdir(tmp_path)
    assert read_gguf_config("tiny.gguf").hidden_size == 32
    assert read_gguf("tiny.gguf").config.num_layers == 1
