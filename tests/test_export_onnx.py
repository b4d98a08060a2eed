"""ONNX export: structure, and onnxruntime against the canonical torch model (prefill, decode, dialogue)."""
import os

import numpy as np
import onnx
import pytest
import torch

from belle_edge.compile.export_onnx import ATTENTION_OP, DOMAIN, export_onnx
from belle_edge.compile.fidelity import run_onnx_logits
from belle_edge.core.load import load_checkpoint
from belle_edge.mask import WINDOW_OFF, MaskConfig
from belle_edge.models.decoder import Decoder
from belle_edge.runtime.backends.ort_backend import OrtBackend, make_session
from belle_edge.runtime.model import ChatModel

from conftest import make_tiny_bloom, make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module", params=["llama", "bloom", "qwen2"])
def exported(request, tmp_path_factory, tiny_tokenizer):
    """(checkpoint, fp32 folder, fp16 folder) for a tiny model of each family."""
    src = str(tmp_path_factory.mktemp(f"src_{request.param}"))
    makers = {"llama": make_tiny_llama, "bloom": make_tiny_bloom, "qwen2": make_tiny_qwen2}
    makers[request.param](src, tiny_tokenizer)
    ckpt = load_checkpoint(src)
    folders = {}
    for dtype in ("float32", "float16"):
        for flavor in ("portable", "ort"):
            folder = str(tmp_path_factory.mktemp(f"onnx_{request.param}_{dtype}_{flavor}"))
            export_onnx(ckpt.config, ckpt.state_dict, folder, dtype=dtype, flavor=flavor)
            folders[dtype if flavor == "portable" else f"{dtype}-ort"] = folder
    return ckpt, folders


def test_graph_follows_the_contract(exported):
    ckpt, folders = exported
    cfg = ckpt.config
    path = os.path.join(folders["float32"], "model.onnx")
    model = onnx.load(path, load_external_data=False)
    assert {o.domain for o in model.opset_import} == {"", DOMAIN}  # portable: standard ops + our node only
    assert os.path.getsize(path) < 200_000 and os.path.isfile(os.path.join(folders["float32"], "model.onnx.data"))
    attn = [n for n in model.graph.node if n.op_type == ATTENTION_OP]
    assert len(attn) == cfg.num_layers and all(n.domain == DOMAIN for n in attn)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, ATTENTION_OP)]
    body = model.functions[0].node
    consumers = {n.op_type for n in body if set(n.input) & {"present_key", "present_value"}}
    assert consumers == {"Transpose", "MatMul"}  # K/V are read in place, never repeated per query head
    assert not any(n.op_type == "Expand" for n in body)
    names = [i.name for i in model.graph.initializer]
    assert names.count("embed.weight") == 1
    assert names.count("lm_head.weight") == (0 if cfg.tie_embeddings else 1)  # tied: stored once
    inputs = [i.name for i in model.graph.input]
    assert inputs[:8] == ["input_ids", "position_ids", "turn_ids", "past_position_ids", "past_turn_ids",
                          "mask_window", "mask_sinks", "num_logits_to_keep"]
    assert inputs[8:] == [f"past_key_values.{i}.{k}" for i in range(cfg.num_layers) for k in ("key", "value")]
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in range(cfg.num_layers) for k in ("key", "value")]
    onnx.checker.check_model(path, full_check=True)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("float16", 1e-2), ("float32-ort", 1e-4),
                                        ("float16-ort", 1e-2)])
@pytest.mark.parametrize("chunk", [48, 16, 1])  # one prefill; prefill in pieces over a cache; token by token
def test_onnxruntime_matches_torch_for_prefill_and_decode(exported, dtype, atol, chunk):
    ckpt, folders = exported
    ids = np.random.default_rng(1).integers(0, ckpt.config.vocab_size, 48)
    got = run_onnx_logits(make_session(os.path.join(folders[dtype], "model.onnx")), ckpt.config, ids, chunk=chunk)
    with torch.no_grad():
        ref = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)(
            torch.from_numpy(ids)[None], np.arange(48), np.zeros(48, np.int64), MaskConfig.off())[0].numpy()
    assert np.abs(got - ref).max() < atol


def test_the_graphs_mask_is_the_mask_module(exported):
    """A dialogue layout with the window on: the graph's attention follows mask.visible exactly."""
    ckpt, folders = exported
    cfg = ckpt.config
    session = make_session(os.path.join(folders["float32"], "model.onnx"))
    rng = np.random.default_rng(2)
    turns = np.repeat(np.arange(6), rng.integers(3, 9, 6))
    t = len(turns)
    ids = rng.integers(0, cfg.vocab_size, t)
    decoder = Decoder.from_state_dict(cfg, ckpt.state_dict)
    for window, sinks in ((1, 2), (0, 0), (3, 4), (None, 0)):
        feeds = {"input_ids": ids[None], "position_ids": np.arange(t)[None], "turn_ids": turns[None],
                 "past_position_ids": np.zeros((1, 0), np.int64), "past_turn_ids": np.zeros((1, 0), np.int64),
                 "mask_window": np.array(WINDOW_OFF if window is None else window), "mask_sinks": np.array(sinks),
                 "num_logits_to_keep": np.array(t)}
        feeds.update({f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
                      for i in range(cfg.num_layers) for k in ("key", "value")})
        got = session.run(["logits"], feeds)[0][0]
        mask = MaskConfig(window=window, sinks=sinks) if window is not None else MaskConfig.off()
        with torch.no_grad():
            ref = decoder(torch.from_numpy(ids)[None], np.arange(t), turns, mask)[0].numpy()
        assert np.abs(got - ref).max() < 1e-4, (window, sinks)


class Recording:
    def __init__(self, inner):
        self.inner, self.logits = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, *args, **kw):
        out = self.inner.forward(*args, **kw)
        self.logits.append(out)
        return out


def test_a_dialogue_on_onnxruntime_matches_torch_with_eviction_and_a_context_shift(exported):
    from belle_edge.api import torch_chat_model

    ckpt, folders = exported
    cfg = ckpt.config
    torch_model = torch_chat_model(ckpt)
    torch_model.max_positions = 96  # small, so the dialogue needs a context shift
    session = make_session(os.path.join(folders["float32"], "model.onnx"))
    ort_model = ChatModel(name="ort", tokenizer=ckpt.tokenizer, chat_format=ckpt.chat_format,
                          stop_token_ids=ckpt.stop_token_ids, max_positions=96, fingerprint="x",
                          backend_factory=lambda cap: OrtBackend(session, num_layers=cfg.num_layers,
                                                                 num_kv_heads=cfg.num_kv_heads,
                                                                 head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                                                                 kv_dtype="float32", capacity=cap))
    a = torch_model.session(system="你是客服。", window=1, sinks=2, max_new_tokens=6)
    b = ort_model.session(system="你是客服。", window=1, sinks=2, max_new_tokens=6)
    a.backend, b.backend = Recording(a.backend), Recording(b.backend)
    for message in ["你好", "订单已经发货了吗？", "Hello!", "请提供您的订单号。", "谢谢！", "再见"]:
        assert a.send(message).text == b.send(message).text
    assert sum(s.evicted_tokens for s in b.stats) > 0 and any(s.context_shift for s in b.stats)
    assert len(a.backend.logits) == len(b.backend.logits)
    assert max(np.abs(x - y).max() for x, y in zip(a.backend.logits, b.backend.logits)) < 1e-4


@pytest.mark.slow
def test_smollm2_exports_and_matches(smollm2_checkpoint, tmp_path):
    cfg = smollm2_checkpoint.config
    record = export_onnx(cfg, smollm2_checkpoint.state_dict, str(tmp_path))
    assert record["bytes"] < 1.01 * 134_515_008 * 4  # the tied 49,152 x 576 embedding is stored once
    ids = np.asarray(smollm2_checkpoint.tokenizer.encode("The turn window keeps memory bounded. 你好！").ids)
    t = len(ids)
    got = run_onnx_logits(make_session(str(tmp_path / "model.onnx")), cfg, ids, chunk=8)
    with torch.no_grad():
        ref = Decoder.from_state_dict(cfg, smollm2_checkpoint.state_dict)(
            torch.from_numpy(ids)[None], np.arange(t), np.zeros(t, np.int64), MaskConfig.off())[0].numpy()
    assert np.abs(got - ref).max() < 1e-4
    # fp16: this model's logits reach ~34, where a half-precision step is 0.03, so the bound is relative
    half = tmp_path / "fp16"
    export_onnx(cfg, smollm2_checkpoint.state_dict, str(half), dtype="float16", flavor="ort")
    got16 = run_onnx_logits(make_session(str(half / "model.onnx")), cfg, ids, chunk=8)
    assert np.abs(got16 - ref).max() < 1e-2 * np.abs(ref).max()
    assert (got16.argmax(-1) == ref.argmax(-1)).all()
