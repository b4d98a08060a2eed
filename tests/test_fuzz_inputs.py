"""Fuzzing the readers of user files (issue "nothing breaks: fuzzing every input").

The rule: each reader either works or raises a ``BelleEdgeError`` subclass whose one-line message names the
problem; no other exception, no hang (hypothesis' deadline bounds every case), no allocation beyond a bound
(tracemalloc's peak per case). Readers fuzzed:

1. ``config.json`` -> ``ModelConfig``: ``read_hf_config``, the families' ``config_from_hf``, ``ModelConfig.from_dict``;
2. ``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.jinja`` / ``tokenizer.model``: ``read_tokenizer``,
   ``_chat_template``, ``load_tokenizer``;
3. chat templates: ``make_chat_format``, ``TemplateFormat`` (rendering of random message lists included),
   ``chat_format_from_dict``;
4. saved sessions: ``ChatSession.restore`` (truncated at every offset, bit flips, random bytes, mutated metadata)
   and ``save`` -> ``restore`` of random sessions;
5. training data: ``read_dialogues``, ``parse_record``, ``clean_file``;
6. dialogue scripts: ``belle-edge chat/demo --script`` (``cli/chat.py`` ``_read_script``);
7. an artifact's ``manifest.json``: ``read_manifest`` (names that leave the folder included) and its chat format.

Fixed seed (``derandomize=True``), no example database: the same cases on every run. ``BELLE_EDGE_FUZZ_EXAMPLES``
scales every example count for a longer run by hand, e.g. ``BELLE_EDGE_FUZZ_EXAMPLES=20 pytest
tests/test_fuzz_inputs.py``. Each bug the fuzzing found has a plain regression test at the end, named after it.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tracemalloc
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from belle_edge.errors import BelleEdgeError, CheckpointError, InputError, SessionFileError, UnsupportedModelError

SCALE = float(os.environ.get("BELLE_EDGE_FUZZ_EXAMPLES", "1"))
DEADLINE = 2.0  # seconds per case (tracemalloc running: ~5x slower than without)
MAX_ALLOC = 64 * 2**20  # peak traced allocation of one case


def fuzz(examples: int, deadline: float = DEADLINE):
    """``deadline``: more for the cases that, beyond the reader, run the model on what it read."""
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=timedelta(seconds=deadline),
                    derandomize=True,
                    database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


def bounded(call, *mentions: str, raises: type = BelleEdgeError, reraise: bool = False):
    """Run one reader call: it returns (its result is returned) or raises a BelleEdgeError (``raises``) with a
    one-line message that mentions each of ``mentions`` (None is returned, or with ``reraise`` the error raised
    again); any other exception fails the case. The peak of what it allocates (tracemalloc) must stay below
    MAX_ALLOC."""
    tracemalloc.start()
    try:
        try:
            return call()
        except BelleEdgeError as e:
            assert isinstance(e, raises), f"{type(e).__name__}, expected {raises.__name__}: {e}"
            message = str(e)
            assert message.strip() and "\n" not in message and "\r" not in message, f"not one line: {message!r}"
            for mention in mentions:
                assert mention in message, f"{mention!r} not named in {message!r}"
            if reraise:
                raise
            return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MAX_ALLOC, f"peak allocation {peak / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- strategies
ODD = [None, True, False, 0, -1, 1, 2, 3, 7, 64, 2**31 - 1, 2**31, 10**30, -(10**30), 0.0, -0.0, 1.5, 1e-300, 1e308,
       float("nan"), float("inf"), float("-inf"), "", "64", "abc", "false", "true", "\n", [], [1], [None], ["x"], {},
       {"a": 1}, {"rope_type": "default"}, {"type": "linear"}]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)
odd_values = st.one_of(st.sampled_from(ODD), json_values)


@st.composite
def mutated(draw, base: dict, extra_keys=()):
    """``base`` with a few fields deleted or replaced by odd values (wrong types, signs, sizes)."""
    d = dict(base)
    keys = sorted(set(base) | set(extra_keys))
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        if draw(st.booleans()) and key in d:
            del d[key]
        else:
            d[key] = draw(odd_values)
    return d


@st.composite
def mutated_bytes(draw, data: bytes):
    """``data`` truncated, with bits flipped, bytes inserted/deleted, a BOM, or invalid UTF-8."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "bom", "invalid_utf8"]))
        at = draw(st.integers(0, len(data)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "bom":
            data[0:0] = b"\xef\xbb\xbf"
        else:
            data[at:at] = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00"]))
    return bytes(data)


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


PATHOLOGICAL_JSON = [deep(100_000), b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"9" * 5000, b'{"x": ' + b"9" * 5000 + b"}",
                     b"", b"\xef\xbb\xbf{}", b"null", b"[]", b'"str"', b"NaN", b"{" * 10, b"\xff\xfe{\x00}\x00"]


# ---------------------------------------------------------------------------------------------- 1. config.json
def _base_configs() -> dict[str, dict]:
    from belle_edge.models import ModelConfig, family

    llama = ModelConfig(family="llama", vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, intermediate_size=128, max_positions=512, norm_eps=1e-6, norm="rms",
                        mlp="swiglu", positions="rope", tie_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
    bloom = ModelConfig(family="bloom", vocab_size=400, hidden_size=96, num_layers=2, num_heads=6, num_kv_heads=6,
                        head_dim=16, intermediate_size=384, max_positions=2048, norm_eps=1e-5, norm="layer",
                        mlp="gelu", positions="alibi", embed_norm=True, attention_bias=True, mlp_bias=True,
                        eos_token_ids=(0,))
    qwen2 = llama.replace(family="qwen2", qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
    return {name: family(name).hf_config(cfg) for name, cfg in (("llama", llama), ("bloom", bloom), ("qwen2", qwen2))}


BASES = _base_configs()
EXTRA_CONFIG_KEYS = ["model_type", "rope_scaling", "rope_parameters", "head_dim", "n_embed", "num_attention_heads",
                     "num_hidden_layers", "attention_bias", "mlp_bias", "use_sliding_window",
                     "apply_residual_connection_post_layernorm", "layer_norm_epsilon", "rms_norm_eps", "seq_length"]
configs = st.sampled_from(sorted(BASES)).flatmap(lambda name: mutated(BASES[name], EXTRA_CONFIG_KEYS))


def _check_config(cfg, hf: dict | None = None) -> None:
    """What a config that reads must be: sane sizes, and written back by the family's hf_config it reads again the
    same (so no field was silently misread, like the string "false" as true)."""
    from belle_edge.models import ModelConfig, family

    assert isinstance(cfg, ModelConfig)
    assert cfg.q_size > 0 and cfg.num_heads % cfg.num_kv_heads == 0
    assert math.isfinite(cfg.norm_eps) and cfg.norm_eps > 0 and math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0
    fam = family(cfg.family)
    assert fam.config_from_hf(fam.hf_config(cfg), where="again") == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@fuzz(800)
@given(hf=configs)
def test_fuzz_config_from_hf(hf):
    from belle_edge.models import family, family_name_for

    def read():
        return family(family_name_for(hf.get("model_type"), "config.json")).config_from_hf(hf, where="config.json")

    cfg = bounded(read, "config.json")
    if cfg is not None:
        _check_config(cfg, hf)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@fuzz(500)
@given(data=st.one_of(configs.map(lambda d: json.dumps(d).encode()),
                      configs.flatmap(lambda d: mutated_bytes(json.dumps(d).encode())),
                      st.sampled_from(PATHOLOGICAL_JSON), st.binary(max_size=64)))
def test_fuzz_config_json_file(workdir, data):
    from belle_edge.core.hf_dir import read_hf_config
    from belle_edge.core.load import load_config

    folder = workdir / "config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    cfg = bounded(lambda: read_hf_config(str(folder)), str(folder))
    if cfg is not None:
        _check_config(cfg)
    assert bounded(lambda: load_config(str(folder)), str(folder)) == cfg


def _base_configs_canonical() -> dict[str, dict]:
    from belle_edge.models import family

    return {name: family(name).config_from_hf(hf, where="base").to_dict() for name, hf in BASES.items()}


CANONICAL = _base_configs_canonical()
model_dicts = st.one_of(st.sampled_from(sorted(CANONICAL)).flatmap(
    lambda name: mutated(CANONICAL[name], ["family", "unknown", "eos_token_ids", "bos_token_id"])), json_values)


@fuzz(300)
@given(d=model_dicts)
def test_fuzz_model_config_from_dict(d):
    from belle_edge.models import ModelConfig

    cfg = bounded(lambda: ModelConfig.from_dict(d))
    if cfg is not None:
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------- 2. tokenizer
@pytest.fixture(scope="module")
def tokenizer_json(tiny_tokenizer) -> dict:
    return json.loads(tiny_tokenizer.to_str())


def _mutate_tree(draw, tree, depth=0):
    """A random subtree of a JSON document replaced by an odd value (or a list/dict entry dropped)."""
    if isinstance(tree, dict) and tree and depth < 4 and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(tree)))
        out = dict(tree)
        if draw(st.integers(0, 4)) == 0:
            del out[key]
        else:
            out[key] = _mutate_tree(draw, tree[key], depth + 1)
        return out
    if isinstance(tree, list) and tree and depth < 4 and draw(st.integers(0, 3)):
        i = draw(st.integers(0, len(tree) - 1))
        return tree[:i] + [_mutate_tree(draw, tree[i], depth + 1)] + tree[i + 1:]
    return draw(odd_values)


SPECIAL_TOKEN_ENTRIES = st.fixed_dictionaries({"id": st.sampled_from(["<|im_start|>", "<zz>", ""]),
                                               "ids": st.lists(st.sampled_from([0, 1, 399, 2**31, -1]), max_size=2),
                                               "tokens": st.lists(st.sampled_from(["a", "<zz>"]), max_size=2)})
# the sections that act at encode time: a file can be valid JSON and load, and then fail (or abort the process)
# on its first text
ENCODE_TIME_SECTIONS = {
    "truncation": st.fixed_dictionaries({"max_length": st.sampled_from([0, 1, 2, 8, 10**12]),
                                         "stride": st.sampled_from([0, 1, 5, 10**6]),
                                         "strategy": st.sampled_from(["LongestFirst", "OnlyFirst", "OnlySecond"]),
                                         "direction": st.sampled_from(["Left", "Right"])}),
    "padding": st.fixed_dictionaries({"strategy": st.sampled_from(["BatchLongest", {"Fixed": 0}, {"Fixed": 10**12}]),
                                      "direction": st.sampled_from(["Left", "Right"]),
                                      "pad_to_multiple_of": st.sampled_from([None, 0, 1, 10**12]),
                                      "pad_id": st.sampled_from([0, 10**9]), "pad_type_id": st.just(0),
                                      "pad_token": st.sampled_from(["<|im_end|>", "x"])}),
    "post_processor": st.fixed_dictionaries({
        "type": st.just("TemplateProcessing"),
        "single": st.lists(st.sampled_from([{"SpecialToken": {"id": "<zz>", "type_id": 0}},
                                            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}]), max_size=3),
        "pair": st.just([]),
        "special_tokens": st.dictionaries(st.sampled_from(["<zz>", "<|im_start|>"]), SPECIAL_TOKEN_ENTRIES, max_size=2)}),
    "decoder": st.sampled_from([{"type": "Strip", "content": " ", "start": 10**6, "stop": 10**6},
                                {"type": "Replace", "pattern": {"String": ""}, "content": "xx"}, None]),
}


@st.composite
def tokenizer_files(draw, base: dict):
    kind = draw(st.sampled_from(["tree", "tree", "bytes", "pathological", "sections"]))
    if kind == "sections":
        tree = dict(base)
        for key in draw(st.lists(st.sampled_from(sorted(ENCODE_TIME_SECTIONS)), min_size=1, max_size=3, unique=True)):
            tree[key] = draw(ENCODE_TIME_SECTIONS[key])
        return json.dumps(tree).encode()
    if kind == "tree":
        tree = base
        for _ in range(draw(st.integers(1, 3))):
            tree = _mutate_tree(draw, tree)
        return json.dumps(tree, allow_nan=True).encode()
    if kind == "bytes":
        return draw(mutated_bytes(json.dumps(base).encode()))
    return draw(st.sampled_from(PATHOLOGICAL_JSON))


tokenizer_configs = st.one_of(
    st.fixed_dictionaries({}, optional={"bos_token": odd_values, "eos_token": odd_values,
                                        "chat_template": st.one_of(odd_values, st.lists(odd_values, max_size=3),
                                                                   st.lists(st.fixed_dictionaries(
                                                                       {}, optional={"name": odd_values,
                                                                                     "template": odd_values}),
                                                                       max_size=3))}),
    json_values)


def _write_checkpoint_files(folder, tokenizer: bytes | None, tok_cfg: bytes | None, jinja: bytes | None = None):
    folder.mkdir(exist_ok=True)
    for name, data in (("tokenizer.json", tokenizer), ("tokenizer_config.json", tok_cfg),
                       ("chat_template.jinja", jinja), ("config.json", json.dumps(BASES["llama"]).encode())):
        path = folder / name
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)


def _check_tokenizer_folder(folder) -> None:
    from belle_edge.core.hf_dir import _chat_template, read_tokenizer
    from belle_edge.core.load import load_tokenizer

    got = bounded(lambda: read_tokenizer(str(folder)), str(folder))
    if got is not None:
        tokenizer, tok_cfg = got
        template = bounded(lambda: _chat_template(str(folder), tok_cfg), str(folder))
        assert template is None or isinstance(template, str)
        assert bounded(lambda: load_tokenizer(str(folder)), str(folder)) is not None


@fuzz(1500)
@given(data=st.data())
def test_fuzz_tokenizer_json(workdir, tokenizer_json, data):
    tokenizer = data.draw(tokenizer_files(tokenizer_json))
    _write_checkpoint_files(workdir / "tok", tokenizer, None)
    _check_tokenizer_folder(workdir / "tok")


@fuzz(800)
@given(tok_cfg=tokenizer_configs, raw=st.one_of(st.none(), st.sampled_from(PATHOLOGICAL_JSON)),
       jinja=st.one_of(st.none(), st.binary(max_size=32), st.text(max_size=32).map(str.encode)))
def test_fuzz_tokenizer_config_and_chat_template_jinja(workdir, tiny_tokenizer, tok_cfg, raw, jinja):
    cfg = raw if raw is not None else json.dumps(tok_cfg, allow_nan=True).encode()
    _write_checkpoint_files(workdir / "tokcfg", tiny_tokenizer.to_str().encode(), cfg, jinja)
    _check_tokenizer_folder(workdir / "tokcfg")


@pytest.fixture(scope="module")
def transformers_imported(workdir):
    """transformers' first import (~100 MB of modules) is no allocation of the reader's."""
    from belle_edge.core.hf_dir import read_tokenizer

    folder = workdir / "spm"
    _write_checkpoint_files(folder, None, b"{}")
    (folder / "tokenizer.model").write_bytes(b"")
    with contextlib.suppress(BelleEdgeError):
        read_tokenizer(str(folder))


@fuzz(20)
@given(model=st.one_of(st.binary(max_size=256), st.sampled_from([b"", b"\x0a\x05hello", b"\x00" * 64])))
def test_fuzz_sentencepiece_tokenizer_model(workdir, transformers_imported, model):
    """No tokenizer.json but a tokenizer.model: transformers converts it (few cases: a slow path)."""
    folder = workdir / "spm"
    (folder / "tokenizer.model").write_bytes(model)
    _check_tokenizer_folder(folder)


# ---------------------------------------------------------------------------------------------- 3. chat templates
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[U] {{ m.content | trim }}\n"
         "{% elif m.role == 'system' %}[S] {{ m.content }}\n{% else %}[A] {{ m.content }}{{ eos_token }}\n"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}[A] {% endif %}")
EXPRS = ["messages", "m", "m.content", "m['role']", "m.role", "loop.index", "loop", "add_generation_prompt",
         "bos_token", "eos_token", "ns.s", "ns", "x", "'abc'", "'<|im_end|>'", "1", "0", "-1", "10**9", "99999", "1.5",
         "none", "true", "[1, 2]", "{'a': 1}", "range(100000)", "range(3)", "messages|length", "messages[0]",
         "messages[-1]['content']", "messages[1:]", "'x' * 100000", "lipsum(5)", "namespace(s='ab')", "dict(a=1)",
         "cycler(1, 2)", "joiner()", "raise_exception('no')", "undefined_name", "m.content.split()", "caller()",
         "messages|map(attribute='content')|list", "f(3)", "varargs", "[m] * 1000", "10 ** 10 ** 10", "2.0 ** 9999"]
FILTERS = ["trim", "upper", "length", "tojson", "tojson(indent=100000)", "join", "join(', ')",
           "replace('a', 'bbbb')", "replace('', 'xx')", "center(10**6)", "center(40)", "indent(4)",
           "indent('>>>>')", "list", "sort", "first", "last", "string", "int", "float", "default('d')",
           "format(1, 2)", "wordwrap(1)", "striptags", "batch(3)", "slice(100000)", "sum", "sum(start=[])",
           "unique", "reverse", "e", "safe", "count", "select('string')", "map('upper')", "items", "dictsort",
           "truncate(5)", "round(2)", "abs", "capitalize", "title", "lower", "urlize", "xmlattr", "pprint",
           "random", "min", "max", "groupby('role')", "selectattr('role', 'equalto', 'user')", "attr('content')"]
OPS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", "and", "or", "in", "not in", "is defined",
       "is string", "if true else"]
METHODS = [".strip()", ".split()", ".startswith('a')", ".upper()", ".replace('a', 'bb')", ".format(1)",
           ".format('{:>99999}')", ".center(10**7)", ".join(['a', 'b'])", ".expandtabs(8)", ".items()",
           ".get('role')", ".append(1)", ".__class__", ".mro()", ".ljust(100000)", ".zfill(5)", ".count('a')"]
INDEXES = ["0", "-1", "1:", "'content'", "x", "10**9"]
JINJA_TOKENS = ["{{", "}}", "{%", "%}", "{#", "#}", "for", "in", "endfor", "if", "endif", "else", "set", "=",
                "macro", "endmacro", "(", ")", "[", "]", "|", ".", ",", "'", '"', "messages", "m", "~", "+", "*", " ",
                "\n", "x", "1", "raw", "endraw", "-", "call", "filter", "endfilter", "break", "continue", "recursive",
                "loop", "include", "import", "extends", "block", "endblock", "\u2063"]


@st.composite
def expressions(draw, depth=0):
    e = draw(st.sampled_from(EXPRS))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["filter", "op", "method", "index", "paren"]))
        if kind == "filter":
            e = f"{e} | {draw(st.sampled_from(FILTERS))}"
        elif kind == "op":
            right = draw(expressions(depth + 1)) if depth < 2 else draw(st.sampled_from(EXPRS))
            e = f"{e} {draw(st.sampled_from(OPS))} {right}"
        elif kind == "method":
            e = f"({e}){draw(st.sampled_from(METHODS))}"
        elif kind == "index":
            e = f"({e})[{draw(st.sampled_from(INDEXES))}]"
        else:
            e = f"({e})"
    return e


@st.composite
def blocks(draw, depth=0):
    kinds = ["text", "output", "output", "set", "nsset"]
    if depth < 3:
        kinds += ["for", "for", "if", "macro", "filterblock", "setblock", "callblock"]
    kind = draw(st.sampled_from(kinds))

    def body():
        return "".join(draw(st.lists(blocks(depth + 1), max_size=3)))

    e = draw(expressions())
    if kind == "text":
        return draw(st.text(max_size=10))
    if kind == "output":
        return f"{{{{ {e} }}}}"
    if kind == "set":
        return f"{{% set x = {e} %}}"
    if kind == "nsset":
        return f"{{% set ns = namespace(s='ab') %}}{{% set ns.s = {draw(st.sampled_from(['ns.s ~ ns.s', 'ns.s + ns.s', 'ns.s * 2', e]))} %}}"
    if kind == "for":
        target = draw(st.sampled_from(["m", "x", "k, v", "m"]))
        rec = draw(st.sampled_from(["", "", " recursive"]))
        return f"{{% for {target} in {e}{rec} %}}{body()}{{% endfor %}}"
    if kind == "if":
        return f"{{% if {e} %}}{body()}{{% else %}}{body()}{{% endif %}}"
    if kind == "macro":
        return f"{{% macro f(n) %}}{body()}{{{{ f(n) }}}}{{% endmacro %}}{body()}"
    if kind == "filterblock":
        return f"{{% filter {draw(st.sampled_from(['upper', 'trim', 'center(100000)', 'indent(8)']))} %}}{body()}{{% endfilter %}}"
    if kind == "setblock":
        return f"{{% set x %}}{body()}{{% endset %}}{{{{ x }}}}{{{{ x }}}}"
    return f"{{% macro g() %}}{{{{ caller() }}}}{{% endmacro %}}{{% call g() %}}{body()}{{% endcall %}}"


@st.composite
def templates(draw):
    kind = draw(st.sampled_from(["grammar", "grammar", "grammar", "soup", "mutated", "odd"]))
    if kind == "grammar":
        parts = draw(st.lists(blocks(), max_size=5))
        core = draw(st.sampled_from([CHATML, PLAIN, ""]))
        parts.insert(draw(st.integers(0, len(parts))), core)
        return "".join(parts)
    if kind == "soup":
        return "".join(draw(st.lists(st.sampled_from(JINJA_TOKENS), max_size=40)))
    if kind == "mutated":
        t = draw(st.sampled_from([CHATML, PLAIN]))
        for _ in range(draw(st.integers(1, 3))):
            a = draw(st.integers(0, len(t)))
            b = draw(st.integers(a, min(len(t), a + 20)))
            t = t[:a] + draw(st.sampled_from(["", t[a:b] * 2, draw(st.sampled_from(JINJA_TOKENS))])) + t[b:]
        return t
    return draw(st.one_of(st.sampled_from(["{{" * 3000 + "}}" * 3000, "{{" + "(" * 3000 + "1" + ")" * 3000 + "}}",
                                           "{% for x in m %}" * 200, "x" * 200_000, CHATML * 500]), odd_values))


messages_text = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "{{ 1 }}", "{% raw %}", "\u2063belle-edge-user\u2063",
                                                            "<|im_end|>", "Human:", "\x00\x1b\r\n", "字" * 50_000]))


def _exercise_format(fmt, system, turns) -> None:
    """Everything a session and the training collator ask of a format, with random text."""
    from belle_edge.runtime.chat_format import chat_format_from_dict
    from belle_edge.runtime.dialogue import dialogue_segments

    bounded(lambda: (fmt.reply_end, fmt.end_token, fmt.system_text(system), fmt.turn_text(turns[0][0]),
                     fmt.first_turn_text(system, turns[0][0]), fmt.note_text(turns[0][1] or "note")))
    bounded(lambda: dialogue_segments(fmt, system, turns, notes={1: "note"}))
    again = bounded(lambda: chat_format_from_dict(json.loads(json.dumps(fmt.to_dict()))))
    assert again == fmt


@fuzz(1500, deadline=4.0)  # a template at the size bound compiles in ~0.3 s, ~5x that under tracemalloc
@given(template=templates(), choice=st.sampled_from(["auto", "template", "belle", "belle-v2", "other"]),
       bos=st.one_of(st.none(), st.sampled_from(["<s>", "<|im_start|>"]), odd_values),
       eos=st.one_of(st.none(), st.sampled_from(["</s>", "<|im_end|>"]), odd_values),
       system=st.one_of(st.none(), messages_text),
       turns=st.lists(st.tuples(messages_text, messages_text), min_size=1, max_size=4))
def test_fuzz_chat_templates(template, choice, bos, eos, system, turns):
    from belle_edge.runtime.chat_format import make_chat_format

    fmt = bounded(lambda: make_chat_format(choice, template=template, bos_token=bos, eos_token=eos, where="ckpt"))
    if fmt is not None:
        _exercise_format(fmt, system, turns)


@fuzz(1000)
@given(d=st.one_of(st.fixed_dictionaries({"kind": st.sampled_from(["template", "belle", "x"])},
                                         optional={"template": st.one_of(st.just(CHATML), odd_values),
                                                   "variant": st.one_of(st.sampled_from(["belle", "belle-v2"]),
                                                                        odd_values),
                                                   "bos_token": odd_values, "eos_token": odd_values}), json_values))
def test_fuzz_chat_format_from_dict(d):
    from belle_edge.runtime.chat_format import chat_format_from_dict

    fmt = bounded(lambda: chat_format_from_dict(d))
    if fmt is not None:
        _exercise_format(fmt, None, [("你好", "您好")])


# ---------------------------------------------------------------------------------------------- 4. sessions
@pytest.fixture(scope="module")
def chat_model(tiny_llama_dir):
    import torch

    from belle_edge.api import torch_chat_model
    from belle_edge.core.load import load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: more threads only wait on each other
    yield torch_chat_model(load_checkpoint(tiny_llama_dir))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_session(chat_model, tmp_path_factory):
    """A valid session file: a system prompt, two known turns, one generated reply (stats, sampler state)."""
    from belle_edge.runtime.sampler import SamplingConfig

    s = chat_model.session(system="你是客服。", sampling=SamplingConfig(temperature=0.8, seed=3), max_new_tokens=4,
                           stop=("Human:",))
    s.add_turn("你好", "您好！")
    s.add_turn("订单发货了吗？", "已经发货了。")
    s.send("谢谢")
    path = tmp_path_factory.mktemp("session") / "s.npz"
    s.save(str(path))
    return path  # (a path, not the bytes: hypothesis prints the arguments of a failing case)


def _use(session) -> None:
    """A restored session must be usable: a turn and the CLI's stats lines. (Not with window 0: a turn of such a
    session can overflow its cache, whether restored or not; see the xfail test at the end.)"""
    from belle_edge.cli.chat import _print_summary, _stats_line

    session.configure(sampling=session.sampling, max_new_tokens=2, stop=session.stop)
    with contextlib.redirect_stdout(io.StringIO()):
        if session.mask.window != 0:
            bounded(lambda: session.send("你好"))
        _print_summary(session)
        for s in session.stats:
            _stats_line(s)


def _restore(chat_model, path) -> None:
    session = bounded(lambda: chat_model.restore(str(path)), str(path))
    if session is not None:
        _use(session)


def test_fuzz_session_truncated_at_every_offset(chat_model, saved_session, workdir):
    """Every offset in the zip's structures (the first and last 4 KiB, and around each member's header) and a
    stride elsewhere (1 with BELLE_EDGE_FUZZ_EXAMPLES >= 16)."""
    data = saved_session.read_bytes()
    stride = max(1, round(32 / SCALE))
    starts = [data.find(b"PK\x03\x04", i) for i in range(len(data))]
    headers = {s for s in starts if s >= 0}
    offsets = set(range(0, len(data), stride)) | set(range(min(4096, len(data)))) | set(
        range(max(0, len(data) - 4096), len(data)))
    offsets |= {o for h in headers for o in range(h, min(h + 256, len(data)))}
    path = workdir / "truncated.npz"
    print(f"session file: {len(offsets)} cuts of {len(data)} bytes")  # the cases tried, for a long run's record
    for offset in sorted(offsets):
        path.write_bytes(data[:offset])
        assert bounded(lambda: chat_model.restore(str(path)), str(path), raises=SessionFileError) is None, offset


@fuzz(300, deadline=10)
@given(data=st.data())
def test_fuzz_session_bit_flips(chat_model, saved_session, workdir, data):
    blob = bytearray(saved_session.read_bytes())
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 7)), min_size=1, max_size=3))
    for at, bit in flips:
        blob[at] ^= 1 << bit
    path = workdir / "flipped.npz"
    path.write_bytes(bytes(blob))
    _restore(chat_model, path)


@fuzz(100, deadline=10)
@given(blob=st.one_of(st.binary(max_size=512), st.sampled_from([b"PK\x05\x06" + b"\x00" * 18, b"\x93NUMPY", b""])))
def test_fuzz_session_random_bytes(chat_model, workdir, blob):
    path = workdir / "random.npz"
    path.write_bytes(blob)
    _restore(chat_model, path)


def _session_parts(blob: bytes) -> tuple[dict, dict]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return json.loads(str(data["meta"])), {k: data[k] for k in ("ids", "positions", "turns", "kv")}


META_KEYS = ["version", "fingerprint", "system", "mask", "sampling", "max_new_tokens", "capacity", "stop", "turn",
             "opened", "history", "pending", "sampler_state", "stats"]


@st.composite
def session_edits(draw, meta: dict, arrays: dict):
    meta = draw(mutated(meta, META_KEYS)) if draw(st.integers(0, 3)) else dict(meta)
    for key in ("mask", "sampling", "sampler_state"):  # fields inside the nested records
        if isinstance(meta.get(key), dict) and draw(st.integers(0, 3)) == 0:
            meta[key] = draw(mutated(meta[key], ["window", "sinks", "temperature", "top_p", "seed", "state"]))
    if isinstance(meta.get("stats"), list) and meta["stats"] and isinstance(meta["stats"][0], dict) and draw(
            st.integers(0, 3)) == 0:
        meta["stats"] = [draw(mutated(meta["stats"][0], ["turn", "ttft_ms", "finish_reason"]))]
    if isinstance(meta.get("history"), list) and meta["history"] and isinstance(meta["history"][0], dict) and draw(
            st.integers(0, 3)) == 0:
        meta["history"] = [draw(mutated(meta["history"][0], ["user", "reply", "other"]))] + meta["history"][1:]
    arrays = dict(arrays)
    for key in draw(st.lists(st.sampled_from(sorted(arrays)), max_size=2, unique=True)):
        a = arrays[key]
        kind = draw(st.sampled_from(["value", "shape", "dtype", "drop"]))
        if kind == "value" and a.size:
            a = a.copy()
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([-1, 0, 10**6, 2**40, 511, 512]))
        elif kind == "shape":
            a = a.reshape(-1)[:draw(st.integers(0, a.size))]
        elif kind == "dtype":
            a = a.astype(draw(st.sampled_from(["float32", "int8", "uint64", "<U3", "bool", "float16"])))
        else:
            a = a[:0]
        arrays[key] = a
    return meta, arrays


@fuzz(150, deadline=10)
@given(data=st.data())
def test_fuzz_session_mutated_metadata(chat_model, saved_session, workdir, data):
    meta, arrays = data.draw(session_edits(*_session_parts(saved_session.read_bytes())))
    path = workdir / "edited.npz"
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta, allow_nan=True)), **arrays)
    _restore(chat_model, path)


@fuzz(40, deadline=10)
@given(system=st.one_of(st.none(), st.text(max_size=20)),
       turns=st.lists(st.tuples(st.text(min_size=1, max_size=20).filter(str.strip), st.text(max_size=20)), max_size=3),
       stop=st.lists(st.text(min_size=1, max_size=5), max_size=3), window=st.one_of(st.none(), st.integers(0, 3)),
       capacity=st.integers(2, 600))
def test_fuzz_session_save_then_restore(chat_model, workdir, system, turns, stop, window, capacity):
    """Random sessions saved and restored: the restore gives the same dialogue (or the session refused a turn)."""
    s = chat_model.session(system=system, window=window, max_kv_tokens=capacity, stop=tuple(stop))
    for user, reply in turns:
        bounded(lambda: s.add_turn(user, reply))
    path = workdir / "saved.npz"
    s.save(str(path))
    restored = bounded(lambda: chat_model.restore(str(path)))
    assert restored is not None
    assert (restored.history, restored.system, restored.stop, restored.kv_tokens) == (s.history, s.system, s.stop,
                                                                                       s.kv_tokens)
    _use(restored)


# ---------------------------------------------------------------------------------------------- 5. training data
names = st.sampled_from(["human", "user", "assistant", "gpt", "bot", "system", "HUMAN", " Gpt ", "other", ""])
records = st.one_of(
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.one_of(names, odd_values), "value": st.one_of(st.text(max_size=20), odd_values)}),
        max_size=5)}, optional={"id": odd_values, "system": st.one_of(st.text(max_size=10), odd_values)}),
    st.fixed_dictionaries({"instruction": st.one_of(st.text(max_size=20), odd_values)},
                          optional={"input": st.one_of(st.text(max_size=20), odd_values),
                                    "output": st.one_of(st.text(max_size=20), odd_values), "id": odd_values}),
    st.builds(lambda d, k, v: {**d, k: v}, st.dictionaries(st.text(max_size=5), json_values, max_size=3),
              st.sampled_from(["conversations", "instruction", "output"]), json_values),
    json_values)
GOOD = {"id": "1", "conversations": [{"from": "human", "value": "你好，请问订单发货了吗？"},
                                     {"from": "assistant", "value": "您好，已经发货了，预计三天内送达。"}]}


@st.composite
def dialogue_files(draw) -> bytes:
    kind = draw(st.sampled_from(["lines", "lines", "array", "bytes", "huge", "pathological"]))
    recs = draw(st.lists(records, max_size=4))
    if kind == "lines":
        sep = draw(st.sampled_from(["\n", "\r\n", "\n\n", "\u2028"]))
        text = sep.join(json.dumps(r, ensure_ascii=draw(st.booleans()), allow_nan=True) for r in recs)
        return (draw(st.sampled_from(["", "\ufeff"])) + text).encode("utf-8", "surrogatepass")
    if kind == "array":
        return json.dumps(recs, indent=draw(st.sampled_from([None, 1])), allow_nan=True).encode("utf-8",
                                                                                                "surrogatepass")
    if kind == "bytes":
        return draw(mutated_bytes(json.dumps(GOOD, ensure_ascii=False).encode() * 2))
    if kind == "huge":  # a 100,000-character reply, half Chinese (cleaning's dedup and language rules see it all)
        n = draw(st.sampled_from([1000, 100_000]))
        codes = np.random.default_rng(draw(st.integers(0, 2**32))).integers(0x4E00, 0x9FFF, n, dtype=np.uint32)
        codes[::2] = codes[::2] % 95 + 32  # every other character ASCII
        reply = codes.astype("<u4").tobytes().decode("utf-32-le")
        record = {"instruction": "你好" + " " * draw(st.sampled_from([0, 100_000])) + "。", "output": reply}
        return json.dumps(record, ensure_ascii=False).encode()
    return draw(st.sampled_from(PATHOLOGICAL_JSON + [b"[" + b"{}," * 1000 + b"]", b"[1, 2,", b"[{}]]"]))


@fuzz(1500)
@given(obj=records)
def test_fuzz_parse_record(obj):
    from belle_edge.core.dialogues import Dialogue, parse_record

    d = bounded(lambda: parse_record(obj, "data.jsonl:7"), "data.jsonl:7")
    assert d is None or isinstance(d, Dialogue)


@fuzz(400)
@given(data=dialogue_files())
def test_fuzz_read_dialogues(workdir, data):
    from belle_edge.core.dialogues import read_dialogues, write_dialogues

    path = workdir / "dialogues.jsonl"
    path.write_bytes(data)
    dialogues = bounded(lambda: read_dialogues(str(path)), str(path))
    if dialogues is not None:  # what reads is written back and read again unchanged (the documented round trip)
        write_dialogues(dialogues, str(workdir / "again.jsonl"))
        assert read_dialogues(str(workdir / "again.jsonl")) == dialogues


@fuzz(80, deadline=10)  # a 100,000-character dialogue's MinHash takes seconds under tracemalloc
@given(data=dialogue_files(), max_tokens=st.sampled_from([2048, 10**7]), threshold=st.sampled_from([0.85, 0.3]))
def test_fuzz_clean_file(workdir, data, max_tokens, threshold):
    from belle_edge.train.clean import CleanConfig, clean_file

    path = workdir / "raw.jsonl"
    path.write_bytes(data)
    config = CleanConfig(max_tokens=max_tokens, near_duplicate_threshold=threshold)
    report = bounded(lambda: clean_file(str(path), str(workdir / "clean.jsonl"), config), str(path))
    assert report is None or report["input"] - report["output"] == sum(
        r["dropped_dialogues"] for r in report["rules"].values())


# ---------------------------------------------------------------------------------------------- 6. dialogue scripts
script_lines = st.one_of(st.text(max_size=20), st.sampled_from(["# comment", "  # indented comment", "", "   ",
                                                                 "\t", "你好！", "/reset", "\x00", "\u2028x", "\x0b"]))


@st.composite
def script_files(draw) -> bytes:
    kind = draw(st.sampled_from(["text", "text", "bytes", "odd"]))
    if kind == "text":
        sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        text = sep.join(draw(st.lists(script_lines, max_size=6)))
        return (draw(st.sampled_from(["", "\ufeff"])) + text).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(mutated_bytes("# 脚本\n你好！\n请问有货吗？\n".encode()))
    return draw(st.sampled_from([b"", b"\xff\xfe#\x00 \x00", b"x" * 2_000_000, "字".encode() * 300_000,
                                 b"\n" * 100_000, b"\xef\xbb\xbf", b"\xef\xbb\xbf# only a comment\n"]))


@fuzz(2000)
@given(data=script_files())
def test_fuzz_dialogue_script(workdir, data):
    from belle_edge.cli.chat import _read_script

    path = workdir / "script.txt"
    path.write_bytes(data)
    messages = bounded(lambda: _read_script(str(path)), str(path))
    if messages is not None:
        assert messages and all(m and m == m.strip() and not m.startswith("#") and "\ufeff" not in m[:1]
                                for m in messages)


def test_a_dialogue_script_that_is_a_folder_or_missing(workdir):
    from belle_edge.cli.chat import _read_script

    for path in (str(workdir), str(workdir / "missing.txt")):
        with pytest.raises(InputError, match="cannot read the dialogue script"):
            _read_script(path)


# ---------------------------------------------------------------------------------------------- 7. manifest.json
@pytest.fixture(scope="module")
def artifact_copy(workdir, tiny_llama_dir):
    """A compiled artifact (ONNX Runtime, fp32) and its manifest; the cases rewrite manifest.json only."""
    from belle_edge.compile.pipeline import CompileConfig, compile_model

    out = workdir / "artifact"
    compile_model(CompileConfig(out=str(out), model=tiny_llama_dir), progress=False)
    return out, json.loads((out / "manifest.json").read_text())


@st.composite
def manifests(draw, base: dict):
    kind = draw(st.sampled_from(["tree", "tree", "tree", "names", "bytes", "pathological"]))
    if kind == "tree":
        tree = base
        for _ in range(draw(st.integers(1, 3))):
            tree = _mutate_tree(draw, tree)
        return json.dumps(tree, allow_nan=True).encode()
    if kind == "names":  # a file name anywhere a manifest names one
        name = draw(st.sampled_from(["../x", "/etc/passwd", "a//b", "", ".", "..", "sub/../../x", "\\server\\x",
                                     "model.onnx\x00", "C:\\x", "~/x", "model.onnx/", "x" * 5000]))
        tree = json.loads(json.dumps(base))
        files = list(tree.get("files", {}))
        where = draw(st.sampled_from(["files", "runtime"]))
        if where == "files" and files:
            tree["files"][name] = tree["files"].pop(draw(st.sampled_from(sorted(files))))
        elif isinstance(tree.get("runtime"), dict):
            field = draw(st.sampled_from(sorted(k for k, v in tree["runtime"].items() if isinstance(v, str)) or ["onnx"]))
            tree["runtime"][field] = name
        return json.dumps(tree).encode()
    if kind == "bytes":
        return draw(mutated_bytes(json.dumps(base).encode()))
    return draw(st.sampled_from(PATHOLOGICAL_JSON))


@fuzz(1500)
@given(data=st.data())
def test_fuzz_manifest(artifact_copy, data):
    """read_manifest (every load opens it), then what a load asks of it next: the chat format record."""
    from belle_edge.manifest import read_manifest
    from belle_edge.runtime.chat_format import chat_format_from_dict

    folder, base = artifact_copy
    raw = data.draw(manifests(base))
    (folder / "manifest.json").write_bytes(raw)
    try:
        manifest = bounded(lambda: read_manifest(str(folder)), str(folder))
        if manifest is not None:
            assert all(os.path.realpath(folder / name).startswith(os.path.realpath(folder) + os.sep)
                       for name in manifest.files), "a name outside the folder was accepted"
            bounded(lambda: chat_format_from_dict(manifest.chat_format))
    finally:
        (folder / "manifest.json").write_text(json.dumps(base))


# ---------------------------------------------------------------------------------------------- regressions
# One plain test per bug the fuzzing found, named after it; each failed before its fix.
def _read_config(tmp_path, **changes):
    from belle_edge.core.hf_dir import read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**BASES["llama"], **changes}, allow_nan=True))
    return read_hf_config(str(tmp_path))


def test_config_rope_scaling_that_is_not_an_object_is_refused_not_an_attribute_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: config field 'rope_scaling': expected an object"):
        _read_config(tmp_path, rope_scaling="linear")


def test_config_size_given_as_a_string_is_refused_not_a_type_error(tmp_path):
    from belle_edge.models import family

    with pytest.raises(CheckpointError, match="config field 'hidden_size': expected a whole number .* got a string '64'"):
        _read_config(tmp_path, hidden_size="64")
    with pytest.raises(CheckpointError, match="config field 'hidden_size'"):
        family("bloom").config_from_hf({**BASES["bloom"], "hidden_size": "96"}, where="config.json")


def test_config_with_zero_attention_heads_is_refused_not_a_zero_division(tmp_path):
    with pytest.raises(CheckpointError, match="config field 'num_attention_heads': expected a whole number"):
        _read_config(tmp_path, num_attention_heads=0, head_dim=None)


def test_config_epsilon_that_is_not_a_finite_positive_number_is_refused(tmp_path):
    for eps in ("small", float("nan"), -1e-6, 0):  # a string raised ValueError; the others were taken as they were
        with pytest.raises(CheckpointError, match="config field 'rms_norm_eps': expected a finite number > 0"):
            _read_config(tmp_path, rms_norm_eps=eps)


def test_config_eos_token_id_that_is_not_a_token_id_is_refused(tmp_path):
    for eos in ("</s>", [None], 1.5, -1):  # ValueError, TypeError, or silently 1 / -1 before
        with pytest.raises(CheckpointError, match="config field 'eos_token_id': expected a token id"):
            _read_config(tmp_path, eos_token_id=eos)


def test_config_flag_given_as_the_string_false_is_not_read_as_true(tmp_path):
    with pytest.raises(CheckpointError, match="config field 'tie_word_embeddings': expected true or false"):
        _read_config(tmp_path, tie_word_embeddings="false")  # bool("false") is True: the head was tied
    assert _read_config(tmp_path, tie_word_embeddings=0).tie_embeddings is False


def test_config_size_beyond_int32_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config field 'vocab_size': expected a whole number in 1..2147483647"):
        _read_config(tmp_path, vocab_size=10**30)


def test_config_json_nested_thousands_deep_or_with_a_5000_digit_number_is_a_checkpoint_error(tmp_path):
    from belle_edge.core.hf_dir import read_hf_config

    for data in (deep(100_000), b'{"vocab_size": ' + b"9" * 5000 + b"}"):  # RecursionError, ValueError before
        (tmp_path / "config.json").write_bytes(data)
        with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
            read_hf_config(str(tmp_path))


def test_model_config_record_that_is_not_an_object_or_misses_fields_is_a_checkpoint_error():
    from belle_edge.models import ModelConfig

    for d in (["vocab_size"], {"family": "llama"}, {**CANONICAL["llama"], "eos_token_ids": 2}):
        with pytest.raises(CheckpointError, match="model config"):
            ModelConfig.from_dict(d)


def _tokenizer_folder(tmp_path, tiny_tokenizer, tok_cfg: dict | None = None, jinja: bytes | None = None):
    _write_checkpoint_files(tmp_path, tiny_tokenizer.to_str().encode(),
                            None if tok_cfg is None else json.dumps(tok_cfg).encode(), jinja)
    return str(tmp_path)


def test_tokenizer_config_with_a_number_for_eos_token_is_refused(tmp_path, tiny_tokenizer):
    """Before, it reached the chat format and stop_token_ids, where tokenizer.token_to_id(2) raised TypeError."""
    from belle_edge.core.hf_dir import read_hf_dir, read_tokenizer

    folder = _tokenizer_folder(tmp_path, tiny_tokenizer, {"eos_token": 2})
    with pytest.raises(CheckpointError, match="tokenizer_config.json: field 'eos_token': expected a string"):
        read_tokenizer(folder)
    with pytest.raises(CheckpointError):
        read_hf_dir(folder)


def _tokenizer_with(tmp_path, tiny_tokenizer, **sections) -> str:
    tree = json.loads(tiny_tokenizer.to_str())
    tree.update(sections)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tree))
    return str(tmp_path / "tokenizer.json")


def test_tokenizer_whose_truncation_panics_on_encode_loads_with_truncation_off(tmp_path, tiny_tokenizer):
    """A stride not below max_length made tokenizers panic (pyo3's PanicException, a BaseException that no
    ``except Exception`` caught) on the first encode; any truncation would also cut a user's message."""
    from belle_edge.runtime.tokenizer_file import read_tokenizer_file

    path = _tokenizer_with(tmp_path, tiny_tokenizer, truncation={"max_length": 1, "stride": 5, "strategy":
                                                                 "LongestFirst", "direction": "Right"})
    text = "一段比一个 token 长得多的话"
    assert read_tokenizer_file(path).encode(text).ids == tiny_tokenizer.encode(text).ids


def test_tokenizer_with_a_fixed_padding_of_a_terabyte_does_not_abort_the_process(tmp_path, tiny_tokenizer):
    """Padding to a fixed 10**12 made tokenizers' Rust code fail to allocate and abort the whole process (no
    exception at all): run in a child so that a regression fails this test rather than killing pytest."""
    import subprocess
    import sys

    path = _tokenizer_with(tmp_path, tiny_tokenizer, padding={
        "strategy": {"Fixed": 10**12}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
        "pad_type_id": 0, "pad_token": "<|im_end|>"})
    code = ("import sys; from belle_edge.runtime.tokenizer_file import read_tokenizer_file as r; "
            "print(len(r(sys.argv[1]).encode('你好').ids))")
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and int(done.stdout) >= 1, done.stderr[-500:]


def test_tokenizer_whose_post_processor_panics_or_erases_text_is_refused(tmp_path, tiny_tokenizer):
    from belle_edge.runtime.tokenizer_file import read_tokenizer_file

    missing = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<zz>", "type_id": 0}}],
               "pair": [], "special_tokens": {}}  # names a special token it does not define: Rust panic
    with pytest.raises(CheckpointError, match=r"tokenizer.json: not a usable tokenizer \(tokenizers failed"):
        read_tokenizer_file(_tokenizer_with(tmp_path, tiny_tokenizer, post_processor=missing))
    erases = dict(missing, special_tokens={"<zz>": {"id": "<zz>", "ids": [], "tokens": []}})
    with pytest.raises(CheckpointError, match="tokenizer.json: not a usable tokenizer .* to no tokens"):
        read_tokenizer_file(_tokenizer_with(tmp_path, tiny_tokenizer, post_processor=erases))


def test_chat_template_list_with_entries_that_are_not_objects_is_refused(tmp_path, tiny_tokenizer):
    from belle_edge.core.hf_dir import _chat_template, read_tokenizer

    folder = _tokenizer_folder(tmp_path, tiny_tokenizer, {"chat_template": ["{{ x }}"]})
    with pytest.raises(CheckpointError, match="field 'chat_template': expected a string or a list"):
        _chat_template(folder, read_tokenizer(folder)[1])  # AttributeError: 'str' object has no attribute 'get'


def test_chat_template_that_is_a_number_is_refused(tmp_path, tiny_tokenizer):
    from belle_edge.core.hf_dir import _chat_template, read_tokenizer

    folder = _tokenizer_folder(tmp_path, tiny_tokenizer, {"chat_template": 5})
    with pytest.raises(CheckpointError, match="field 'chat_template': expected a string, got int"):
        _chat_template(folder, read_tokenizer(folder)[1])


def test_chat_template_jinja_that_is_not_utf8_is_a_checkpoint_error(tmp_path, tiny_tokenizer):
    from belle_edge.core.hf_dir import _chat_template

    folder = _tokenizer_folder(tmp_path, tiny_tokenizer, {}, jinja=b"{{ '\xff' }}")
    with pytest.raises(CheckpointError, match="chat_template.jinja: not readable UTF-8"):
        _chat_template(folder, {})  # UnicodeDecodeError before


def test_template_that_is_not_a_string_is_refused():
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="chat template: expected a string, got int"):
        TemplateFormat(5)  # TypeError: Can't compile non template nodes


@pytest.mark.parametrize("expression", ["1 / 0", "2.0 ** 100000", "(10 ** 5000) ~ ''"])
def test_template_that_raises_zero_division_or_overflow_is_refused(expression):
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="chat template cannot render a conversation"):
        TemplateFormat("{{ " + expression + " }}" + CHATML)


def test_template_with_endless_recursion_is_refused():
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="RecursionError"):
        TemplateFormat("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}" + CHATML)


def test_template_nested_thousands_deep_is_refused():
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="chat template does not compile"):
        TemplateFormat("{{" + "(" * 5000 + "1" + ")" * 5000 + "}}" + CHATML)  # RecursionError before


@pytest.mark.parametrize("loop", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set r = range(100000) | list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"])
def test_template_that_loops_for_hours_is_stopped(loop):
    """10**10 loop steps, or 2**40 macro calls: a render that did not end."""
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="TemplateLimitError: more steps than the bound"):
        bounded(lambda: TemplateFormat(loop + CHATML), reraise=True)


@pytest.mark.parametrize("build", [
    "{{ 'x' * 10**10 }}", "{{ 10 ** (10 ** 6) }}", "{{ 'x' | center(10**9) }}", "{{ 'x'.ljust(10**9) }}",
    "{{ '%999999999s' | format(1) }}", "{{ '{:>999999999}'.format(1) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set s = 'xxxxxxxxxx' %}" + "{% set s = s ~ s %}" * 40,
    "{% set s = 'x' * 100000 %}{{ ([s] * 1000) | join }}", "{% set s = 'x' * 100000 %}{{ s | replace('x', s) }}",
    "{% set s = ('x\n' * 100000) %}{{ s | indent(s) }}", "{{ [[1] * 1000] * 1000 | sum(start=[]) }}",
    "{% set s = 'x' * 100000 %}{% filter upper %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endfilter %}",
    "{% set s = 'x' * 100000 %}{% macro m() %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}"
    "{% set x = m() %}", "{{ lipsum(10**6) }}", "{{ ('\t' * 100000).expandtabs(100000) }}"])
def test_template_that_builds_gigabytes_is_stopped(build):
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="chat template cannot render a conversation"):
        bounded(lambda: TemplateFormat(build + CHATML), reraise=True)


def test_template_that_never_renders_the_users_message_is_refused():
    """Such a template compiled and was used: the model never saw what the user wrote."""
    from belle_edge.runtime.chat_format import TemplateFormat

    with pytest.raises(UnsupportedModelError, match="does not render the user's messages"):
        TemplateFormat("{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}\n{% endif %}{% endfor %}")


def test_chat_format_record_that_is_not_an_object_or_lacks_its_template_is_an_input_error():
    from belle_edge.runtime.chat_format import chat_format_from_dict

    with pytest.raises(InputError, match="chat format: expected an object, got list"):
        chat_format_from_dict([])  # AttributeError before
    with pytest.raises(InputError, match="kind 'template' without a field 'template'"):
        chat_format_from_dict({"kind": "template"})  # KeyError before


def test_belle_format_with_a_number_for_eos_token_or_a_list_variant_is_an_input_error():
    from belle_edge.runtime.chat_format import chat_format_from_dict

    with pytest.raises(InputError, match="eos_token: expected a string"):
        chat_format_from_dict({"kind": "belle", "variant": "belle-v2", "eos_token": 5})  # TypeError in reply_end
    with pytest.raises(InputError, match="unknown BELLE variant"):
        chat_format_from_dict({"kind": "belle", "variant": ["belle"]})  # TypeError: unhashable type


def _rewrite_session(source, target, meta_changes=None, **arrays_changes):
    meta, arrays = _session_parts(source.read_bytes())
    meta = meta_changes(meta) if callable(meta_changes) else {**meta, **(meta_changes or {})}
    with open(target, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **{**arrays, **arrays_changes})
    return str(target)


def test_session_file_whose_metadata_is_not_an_object_is_a_session_file_error(chat_model, saved_session, tmp_path):
    path = _rewrite_session(saved_session, tmp_path / "s.npz", lambda meta: [meta])
    with pytest.raises(SessionFileError, match="meta: expected an object, got list"):
        chat_model.restore(path)  # AttributeError: 'list' object has no attribute 'get'


def test_session_file_with_a_kv_array_of_another_shape_is_a_session_file_error(chat_model, saved_session, tmp_path):
    kv = _session_parts(saved_session.read_bytes())[1]["kv"]
    path = _rewrite_session(saved_session, tmp_path / "s.npz", kv=kv[:, :, :1])
    with pytest.raises(SessionFileError, match="field kv: expected float"):
        chat_model.restore(path)  # RuntimeError from torch's copy before


def test_session_file_with_a_huge_capacity_does_not_allocate_it(chat_model, saved_session, tmp_path):
    """The ledger took np.zeros(capacity) x 3 and the backend a KV cache of that many slots."""
    path = _rewrite_session(saved_session, tmp_path / "s.npz", {"capacity": 10**9})
    session = bounded(lambda: chat_model.restore(path))
    assert session.ledger.capacity == chat_model.max_positions


@pytest.mark.parametrize("field, value", [("sampler_state", {"bit_generator": "PCG64"}), ("stats", [{"turn": 1}]),
                                          ("stats", [None]), ("turn", "3"), ("stop", "Human:"),
                                          ("history", [{"user": 1}])])
def test_session_file_with_a_bad_field_is_a_session_file_error(chat_model, saved_session, tmp_path, field, value):
    """sampler_state and stats were read after the checks (KeyError, TypeError); turn, stop ("Human:" became five
    one-letter stop strings) and history were taken as they were and failed later, or never."""
    path = _rewrite_session(saved_session, tmp_path / "s.npz", {field: value})
    with pytest.raises(SessionFileError, match="damaged session file"):
        chat_model.restore(path)


@pytest.mark.parametrize("array, index, value", [("ids", 0, 10**6), ("positions", 3, 10**6), ("turns", -1, 99)])
def test_session_file_with_token_ids_or_positions_out_of_range_is_refused(chat_model, saved_session, tmp_path, array,
                                                                         index, value):
    """Restored as they were, they failed at the next re-prefill (an index error in the embedding or RoPE)."""
    a = _session_parts(saved_session.read_bytes())[1][array].copy()
    a[index] = value
    path = _rewrite_session(saved_session, tmp_path / "s.npz", **{array: a})
    with pytest.raises(SessionFileError, match=f"field {array}"):
        chat_model.restore(path)


def test_session_file_that_is_a_bare_npy_array_is_a_session_file_error(chat_model, tmp_path):
    path = tmp_path / "s.npz"
    np.save(path.open("wb"), np.zeros(3))
    with pytest.raises(SessionFileError, match="not an .npz archive"):
        chat_model.restore(str(path))  # AttributeError: __enter__


def test_session_file_member_declaring_gigabytes_is_refused_before_allocating(chat_model, saved_session, tmp_path):
    """np.load allocates what an .npy header declares: a flipped shape made it ask for terabytes."""
    blob = saved_session.read_bytes()
    old = b"'shape': (90,), }" + b" " * 10  # the ids header (its padding keeps every offset in place)
    new = b"'shape': (1000000000,), }".ljust(len(old))
    path = tmp_path / "s.npz"
    path.write_bytes(blob.replace(old, new, 1))
    assert path.read_bytes() != blob
    with pytest.raises(SessionFileError, match="not a readable belle_edge session file"):
        bounded(lambda: chat_model.restore(str(path)), reraise=True)


def test_session_file_with_a_flipped_npy_header_is_a_session_file_error(chat_model, saved_session, tmp_path):
    blob = bytearray(saved_session.read_bytes())
    blob[66] ^= 1  # the "{" opening the header dict of meta.npy: numpy raised tokenize.TokenError
    path = tmp_path / "s.npz"
    path.write_bytes(bytes(blob))
    with pytest.raises(SessionFileError, match="not a readable belle_edge session file"):
        chat_model.restore(str(path))


def test_session_file_with_a_line_break_in_its_fingerprint_gives_one_line(chat_model, saved_session, tmp_path):
    path = _rewrite_session(saved_session, tmp_path / "s.npz", {"fingerprint": "a\nb"})
    with pytest.raises(SessionFileError, match="saved from another model") as e:
        chat_model.restore(path)
    assert "\n" not in str(e.value)


@pytest.mark.xfail(strict=True, reason="ChatSession turn planning (not a reader; reported, not fixed here): with "
                                       "window 0, a turn whose previous reply's close does not fit before eviction "
                                       "is planned without that close and overflows the cache")
def test_a_window_0_turn_after_a_nearly_full_cache_does_not_overflow(chat_model):
    s = chat_model.session(window=0, max_kv_tokens=21)
    s.add_turn("\U000929f4", "[")
    with contextlib.suppress(BelleEdgeError):
        s.send("你好")  # ValueError: could not broadcast input array from shape (16,) into shape (15,)


def test_dialogue_file_with_a_5000_digit_number_or_deep_nesting_is_an_input_error(tmp_path):
    from belle_edge.core.dialogues import read_dialogues

    path = tmp_path / "d.jsonl"
    for data in (b'{"id": ' + b"9" * 5000 + b"}", deep(100_000), b"[" + deep(100_000) + b"]",
                 b'{"a":' * 50_000):  # ValueError, RecursionError before
        path.write_bytes(data)
        with pytest.raises(InputError, match="d.jsonl:1: invalid JSON"):
            read_dialogues(str(path))


def test_record_with_a_line_break_in_a_field_name_gives_a_one_line_error():
    from belle_edge.core.dialogues import parse_record

    with pytest.raises(InputError, match="got fields: \\\\n, output") as e:
        parse_record({"\n": None, "output": None}, "d.jsonl:1")
    assert "\n" not in str(e.value)


def test_cleaning_a_long_run_of_spaces_takes_linear_time():
    """r"[ \\t]+$" (MULTILINE) backtracked quadratically: 40,000 spaces took 4 s, 400,000 would take minutes."""
    import time

    from belle_edge.train.clean import clean_whitespace

    t0 = time.perf_counter()
    assert clean_whitespace("a" + " " * 400_000 + "b \t\nc  ") == "a b\nc"
    assert time.perf_counter() - t0 < 1


def test_near_duplicate_check_of_a_long_dialogue_allocates_little():
    """All shingles hashed at once made a (shingles, 128) uint64 array: 250 MB for 200,000 characters."""
    from datasketch import MinHash

    from belle_edge.train.clean import MINHASH_SEED, NUM_PERM, _NearDuplicates

    codes = np.random.default_rng(0).integers(0x4E00, 0x9FFF, 200_000, dtype=np.uint32)
    text = codes.astype("<u4").tobytes().decode("utf-32-le")
    near = _NearDuplicates(0.85)
    assert bounded(lambda: near.seen(text)) is False
    whole = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)  # the same signature as hashing the set at once
    whole.update_batch(list({text[i:i + 5].encode() for i in range(len(text) - 4)}))
    assert (near.kept[0] == whole.hashvalues).all()


def test_language_detection_of_a_long_reply_allocates_little():
    """len(re.findall(...)) made a list of one string per letter: ~80 bytes per character."""
    from belle_edge.train.clean import detect_language

    text = "中文回答" * 250_000
    tracemalloc.start()
    assert detect_language(text) == "zh"
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < len(text.encode("utf-16-le")) // 2  # 80 MB before: it is 2 MB of text


def test_dialogue_script_with_a_bom_keeps_its_first_comment_a_comment(tmp_path):
    from belle_edge.cli.chat import _read_script

    path = tmp_path / "script.txt"
    path.write_bytes("\ufeff# 脚本\n你好！\n\ufeff# joined with cat\n请问有货吗？\n".encode())
    assert _read_script(str(path)) == ["你好！", "请问有货吗？"]  # "\ufeff# 脚本" was a message


def test_a_chat_template_over_50000_characters_is_refused_before_it_compiles():
    """Fuzzing at 10x the CI count found 100,000 characters of repeated loops (under the old bound) taking
    seconds to compile; the bound is now 50,000, over three times the largest published template."""
    from belle_edge.runtime.chat_format import TemplateFormat

    loop = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.raises(UnsupportedModelError, match=r"chat template: \d+ characters, more than 50000"):
        TemplateFormat(loop * (50_000 // len(loop) + 1))


def test_a_manifest_nested_thousands_deep_is_an_artifact_error(artifact_copy, tmp_path):
    """RecursionError escaped read_manifest before (fuzzing)."""
    import shutil

    from belle_edge.manifest import ArtifactError, read_manifest

    folder = tmp_path / "art"
    shutil.copytree(artifact_copy[0], folder)
    for data in (deep(100_000), b'{"version": ' + b"9" * 5000 + b"}"):
        (folder / "manifest.json").write_bytes(data)
        with pytest.raises(ArtifactError, match="manifest.json: not readable JSON"):
            read_manifest(str(folder))


def test_a_manifest_naming_a_file_with_a_nul_byte_is_refused(artifact_copy, tmp_path):
    """ValueError (embedded null byte) from os.path escaped read_manifest before (fuzzing)."""
    import shutil

    from belle_edge.manifest import ArtifactError, read_manifest

    folder = tmp_path / "art"
    shutil.copytree(artifact_copy[0], folder)
    manifest = dict(artifact_copy[1], files=dict(artifact_copy[1]["files"]))
    manifest["files"]["model.onnx\x00"] = manifest["files"].pop("model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="is not a file name inside the artifact folder"):
        read_manifest(str(folder))


def test_a_manifest_whose_version_is_a_line_break_gives_one_line(artifact_copy, tmp_path):
    """The version was printed as it was, line break included (fuzzing, at CI size)."""
    import shutil

    from belle_edge.manifest import ArtifactError, read_manifest

    folder = tmp_path / "art"
    shutil.copytree(artifact_copy[0], folder)
    (folder / "manifest.json").write_text(json.dumps({**artifact_copy[1], "version": "\n"}))
    with pytest.raises(ArtifactError, match=r"artifact version '\\n', this belle_edge reads 2") as e:
        read_manifest(str(folder))
    assert "\n" not in str(e.value)


def test_a_manifest_key_holding_a_line_break_is_named_on_one_line(artifact_copy, tmp_path):
    """A key of "files" with a carriage return was echoed into the message as it was (fuzzing, 8x CI)."""
    import shutil

    from belle_edge.manifest import ArtifactError, read_manifest

    folder = tmp_path / "art"
    shutil.copytree(artifact_copy[0], folder)
    (folder / "manifest.json").write_text(json.dumps({**artifact_copy[1], "files": {"\r": None}}))
    with pytest.raises(ArtifactError, match=r"field files\.'\\r': expected") as e:
        read_manifest(str(folder))
    assert "\r" not in str(e.value)
