"""Weight-only quantization for the GPU targets: the weights TensorRT (and our GEMM plugin) read at 4 or 8 bits
while activations stay fp16. Batch-1 decode on an Orin or an RTX 3090 is bound by the bytes read per token,
so this is what makes a 3B model fast there (DESIGN.md, "Facts added 2026-12-01").

Formats (the ONNX contract that carries them is in export_onnx.py):

* ``int4``: signed 4-bit codes in [-8, 7], **symmetric** (TensorRT's parser takes no zero point for INT4),
  one fp16 scale per ``GROUP`` = 128 consecutive inputs of an output channel;
* ``int8``: signed 8-bit codes in [-128, 127], one fp16 scale per output channel.

``w ≈ scale * code``. The codes are kept as :class:`~belle_edge.core.quantized.BlockQuantized` (unsigned code =
code + 2^(bits-1), a constant zero point of 2^(bits-1), per-channel int8 = one block as wide as the input),
so the quantized checkpoint folder, ``belle-edge quantize`` and ``export`` are the CPU path's; the record's
``layout`` ("symmetric") tells export which graph to write.

Methods:

* ``rtn``: scale = max|w| / qmax per group; the baseline.
* ``awq`` (Lin et al., "AWQ", 2023): a few input channels carry much larger activations than the rest, and
  their weights matter most. For every set of linears that read one input, a per-channel factor ``s`` is
  searched on calibration activations ``x``: the linears are quantized as ``Q(W·diag(s))`` and their input
  divided by ``s``, which is folded into whatever produces that input (a norm's weight and bias, ``v_proj``'s
  rows for ``o_proj``, ``up_proj``'s rows for ``down_proj`` in SwiGLU), so the float model is unchanged and
  only the rounding moves. ``s = mean|x|^α / mean|ŵ|^(1-α)`` (ŵ: |w| over its group's max) with α on a
  grid, the plain weights (s = 1) also a candidate; the one with the smallest output error on the
  calibration tokens wins. Then each weight's per-group clipping range is searched (max|w| times 1,
  0.95 … 0.55) on the same output error, except q/k_proj, whose errors multiply in q·k.

Scaling groups per layer: attn_norm → q/k/v; v_proj → o_proj (with grouped KV heads one v channel feeds
the same channel of each query head in its group, so those o inputs share one factor); mlp_norm →
gate/up (or BLOOM's up); up_proj → down_proj (SwiGLU only: GELU is not linear in its input).

The LM head (and a tied embedding, the same tensor) is fp16, or int8 per row with ``head="int8"``. An int4
model may keep ``int8_share`` of its linear parameters at INT8: the tensors whose output error at INT4 is
largest on the calibration tokens (measured after AWQ's scaling), bits per tensor in the record.
Calibration text is :func:`belle_edge.core.texts.calibration_texts` (never the held-out half that fidelity
reads). The plan — α and the scale range per scaling group, clip ratios per tensor, bits per tensor — goes
into the record, and the full scales and clip ratios into the folder's ``plan.safetensors``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.quantized import BlockQuantized
from ..errors import InputError
from ..footprint import GPU_INT4_GROUP as GROUP
from ..footprint import HEADS
from ..models.config import ModelConfig

METHODS = ("rtn", "awq")
ALPHAS = tuple(i / 20 for i in range(20))  # 0 .. 0.95
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # 1 .. 0.55
SEARCH_TOKENS = 256  # calibration tokens the searches measure output error on: the cost is linear in them
LAYOUT = "symmetric"


@dataclass(frozen=True)
class WeightOnlyRequest:
    precision: str  # "int4" | "int8"
    method: str | None = None  # "awq" | "rtn"; None: awq for int4, rtn for int8 (where rounding costs little)
    head: str = "fp16"  # the LM head (and a tied embedding): "fp16" | "int8"
    calibration_tokens: int = 512
    texts: tuple[str, ...] | None = None  # calibration texts; None: core/texts.py's calibration half
    int8_share: float = 0.0  # int4: this share of the linears' parameters kept at INT8, the most sensitive first

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", "awq" if self.precision == "int4" else "rtn")
        if not 0.0 <= self.int8_share <= 1.0:
            raise InputError(f"--int8-share {self.int8_share}: expected a share between 0 and 1")
        if self.precision not in ("int4", "int8"):
            raise InputError(f"weight-only precision {self.precision!r}: expected int4 or int8")
        if self.method not in METHODS:
            raise InputError(f"--quant-method {self.method!r}: expected {' or '.join(METHODS)}")
        if self.head not in HEADS:
            raise InputError(f"--head {self.head!r}: expected {' or '.join(HEADS)}")

    @property
    def bits(self) -> int:
        return 4 if self.precision == "int4" else 8


@dataclass
class Plan:
    """What the quantizer chose, for the record and plan.safetensors."""
    bits: dict[str, int] = field(default_factory=dict)  # tensor -> bits
    alphas: dict[str, float | None] = field(default_factory=dict)  # scaling group -> α (None: s = 1 won)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # scaling group -> s (K,)
    clips: dict[str, np.ndarray] = field(default_factory=dict)  # tensor -> clip ratio per (row, group)


def quantize_weight_only(cfg: ModelConfig, state_dict: dict, tokenizer, request: WeightOnlyRequest
                         ) -> tuple[dict, dict[str, BlockQuantized], dict, Plan]:
    """The state dict with AWQ's factors folded in (floats), the quantized weights, the record, the plan."""
    t0 = time.perf_counter()
    names = _linear_names(cfg)
    for name in names:
        k = state_dict[name].shape[1]
        if request.bits == 4 and k % GROUP:
            raise InputError(f"{name}: input width {k} is not a multiple of {GROUP}; INT4 group-{GROUP} weights "
                             "need one (use int8, or prune to a width that is)")
    # no copy: every change below makes new tensors (a 3B model in fp32 is 12 GB; it is held once)
    weights = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    plan = Plan()
    calibration = None
    if request.method == "awq" or (request.bits == 4 and request.int8_share > 0):
        calibration = _calibrate(cfg, weights, tokenizer, request)
    awq, rank = request.method == "awq", request.bits == 4 and request.int8_share > 0
    if awq and rank:  # ranking the tensors needs every layer scaled first
        for i in range(cfg.num_layers):
            _apply_awq(cfg, i, weights, calibration.inputs, request.bits, plan)
    promoted = _most_sensitive(names, weights, calibration, request.int8_share) if rank else set()
    quantized = {}
    for i in range(cfg.num_layers):  # layer by layer, so only one layer's scaled float weights are held
        if awq and not rank:
            _apply_awq(cfg, i, weights, calibration.inputs, request.bits, plan)
        for name in (n for n in names if n.startswith(f"layers.{i}.")):
            bits = 8 if name in promoted else request.bits
            x = calibration.inputs_of(name) if calibration is not None and request.method == "awq" else None
            clip = x is not None and bits == 4 and not name.endswith(("q_proj.weight", "k_proj.weight"))
            quantized[name] = _quantize(weights.pop(name), bits, GROUP if bits == 4 else None, request.method,
                                        x if clip else None, plan, name)
        if calibration is not None:
            calibration.drop_layer(i)
    head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    if request.head == "int8":
        quantized[head] = _quantize(weights[head], 8, None, "rtn", None, plan, head)  # rows: vocabulary entries
    dense = {k: v for k, v in weights.items() if k not in quantized}  # norms (with AWQ's factors), biases, ...
    record = _record(cfg, request, quantized, plan, calibration, time.perf_counter() - t0)
    return dense, quantized, record, plan


# ------------------------------------------------------------------------------------------- the codes
def fake_quantize(w: torch.Tensor, bits: int, group: int | None, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest of ``w`` (N, K) with fp16 scales (what the graph stores), dequantized."""
    codes, scale = _codes(w, bits, group, amax)
    n, k = w.shape
    g = group or k
    return (codes.view(n, k // g, g) * scale[..., None]).view(n, k)


def _codes(w: torch.Tensor, bits: int, group: int | None, amax: torch.Tensor | None = None):
    n, k = w.shape
    g = group or k
    blocks = w.view(n, k // g, g)
    qmax = (1 << (bits - 1)) - 1
    if amax is None:
        amax = blocks.abs().amax(-1)
    scale = (amax / qmax).half().float()  # rounded as it is stored
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, codes 0
    codes = torch.clamp(torch.round(blocks / scale[..., None]), -qmax - 1, qmax)
    return codes.view(n, k), scale


def _quantize(w: torch.Tensor, bits: int, group: int | None, method: str, x: torch.Tensor | None, plan: Plan,
              name: str) -> BlockQuantized:
    amax = None
    if x is not None:
        ratios = _search_clip(x, w, bits, group or w.shape[1])
        plan.clips[name] = ratios.numpy()
        n, k = w.shape
        amax = w.view(n, k // (group or k), -1).abs().amax(-1) * ratios
    codes, scale = _codes(w, bits, group, amax)
    plan.bits[name] = bits
    offset = 1 << (bits - 1)
    return BlockQuantized(bits, group or w.shape[1], (codes + offset).to(torch.uint8).numpy(),
                          scale.numpy().astype(np.float32), np.full(tuple(scale.shape), offset, np.uint8), None,
                          method)


def is_symmetric(q: BlockQuantized) -> bool:
    """Whether ``q`` is in the GPU layout: constant zero point 2^(bits-1), no offsets."""
    return q.offsets is None and bool((q.zero_points == (1 << (q.bits - 1))).all())


def signed_codes(q: BlockQuantized) -> np.ndarray:
    """The codes as signed integers (int8 array; int4 values in [-8, 7])."""
    return (q.codes.astype(np.int16) - (1 << (q.bits - 1))).astype(np.int8)


def _most_sensitive(names: list[str], weights: dict, calibration: "Calibration | None", share: float) -> set[str]:
    """The linears to keep at INT8 in an int4 model: ranked by the relative output error INT4 gives them on the
    calibration tokens, taken from the top until ``share`` of the linear parameters is reached (the idea of
    llama.cpp's Q4_K_M, which keeps some tensors at more bits — chosen here by measurement, not by name)."""
    if share <= 0 or calibration is None:
        return set()
    errors = {}
    with torch.no_grad():
        for name in names:
            x = _spread(calibration.inputs_of(name), SEARCH_TOKENS)
            w = weights[name]
            ref = x @ w.T
            errors[name] = float((x @ fake_quantize(w, 4, GROUP).T - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-12))
    total = sum(weights[n].numel() for n in names)
    chosen, size = set(), 0
    for name in sorted(names, key=errors.get, reverse=True):
        if size >= share * total:
            break
        chosen.add(name)
        size += weights[name].numel()
    return chosen


# ------------------------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    inputs: dict[str, torch.Tensor]  # "layers.{i}.{qkv|o|mlp|down}" -> (T, K) inputs, fp32
    tokens: int
    description: str

    def drop_layer(self, i: int) -> None:
        """Free layer ``i``'s inputs once its linears are quantized."""
        for key in [k for k in self.inputs if k.startswith(f"layers.{i}.")]:
            del self.inputs[key]

    def inputs_of(self, name: str) -> torch.Tensor | None:
        layer, kind = name.split(".")[1], name.split(".")[3]
        key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "mlp",
               "up_proj": "mlp", "down_proj": "down"}[kind]
        return self.inputs.get(f"layers.{layer}.{key}")


@torch.no_grad()
def _calibrate(cfg: ModelConfig, weights: dict, tokenizer, request: WeightOnlyRequest) -> Calibration:
    """The input of every linear on the calibration tokens: one pass of the float model with hooks."""
    from ..core.fidelity import forward_chunks
    from ..core.texts import calibration_description, calibration_texts
    from ..models.decoder import Decoder
    from .prune.calibration import calibration_ids

    texts = list(request.texts) if request.texts is not None else calibration_texts()
    chunks = calibration_ids(tokenizer, texts, tokens=request.calibration_tokens)
    model = Decoder.from_state_dict(cfg, weights)
    store: dict[str, list[torch.Tensor]] = {}

    def keep(key):
        def hook(_m, args):
            store.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).float().clone())
        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        handles += [layer.attn.q_proj.register_forward_pre_hook(keep(p + "qkv")),
                    layer.attn.o_proj.register_forward_pre_hook(keep(p + "o")),
                    layer.mlp.up_proj.register_forward_pre_hook(keep(p + "mlp")),
                    layer.mlp.down_proj.register_forward_pre_hook(keep(p + "down"))]
    try:
        tokens = sum(len(ids) for ids, _ in forward_chunks(model, chunks))
    finally:
        for h in handles:
            h.remove()
    description = "custom" if request.texts is not None else calibration_description()
    return Calibration({k: torch.cat(v) for k, v in store.items()}, tokens, description)


# ------------------------------------------------------------------------------------------- AWQ
@dataclass(frozen=True)
class _ScalingGroup:
    name: str  # "layers.{i}.qkv" ...: also the key of its calibration inputs
    previous: tuple[str, ...]  # tensors whose output channels are divided by s (norm weight/bias, v/up rows)
    linears: tuple[str, ...]  # weights whose input channels are multiplied by s
    shared: tuple[int, int, int] | None = None  # GQA v -> o: (kv heads, query heads per kv head, head dim)

    def tie(self, v: torch.Tensor) -> torch.Tensor:
        """A per-channel statistic of o's input made equal across the query heads that read one v head, so
        the factor can be folded into that v head's rows."""
        if self.shared is None:
            return v
        kv, group, d = self.shared
        return v.view(kv, group, d).mean(1, keepdim=True).expand(kv, group, d).reshape(-1)

    def for_previous(self, s: torch.Tensor) -> torch.Tensor:
        """The factor on the previous tensor's output channels (one per v channel under GQA)."""
        if self.shared is None:
            return s
        kv, group, d = self.shared
        return s.view(kv, group, d)[:, 0].reshape(-1)


def _scaling_groups(cfg: ModelConfig, i: int, weights: dict) -> list[_ScalingGroup]:
    p = f"layers.{i}."
    with_bias = lambda *names: tuple(n for n in names if n in weights)  # noqa: E731
    groups = [_ScalingGroup(p + "qkv", with_bias(p + "attn_norm.weight", p + "attn_norm.bias"),
                            tuple(p + f"attn.{x}_proj.weight" for x in "qkv"))]
    # v's output channels feed o's inputs: one to one, or (GQA) each to the query heads of its group, which
    # then share its factor
    shared = None if cfg.group_size == 1 else (cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
    groups.append(_ScalingGroup(p + "o", with_bias(p + "attn.v_proj.weight", p + "attn.v_proj.bias"),
                                (p + "attn.o_proj.weight",), shared))
    mlp_in = ("gate", "up") if cfg.mlp == "swiglu" else ("up",)
    groups.append(_ScalingGroup(p + "mlp", with_bias(p + "mlp_norm.weight", p + "mlp_norm.bias"),
                                tuple(p + f"mlp.{x}_proj.weight" for x in mlp_in)))
    if cfg.mlp == "swiglu":  # silu(gate) * up is linear in up
        groups.append(_ScalingGroup(p + "down", with_bias(p + "mlp.up_proj.weight", p + "mlp.up_proj.bias"),
                                    (p + "mlp.down_proj.weight",)))
    return groups


@torch.no_grad()
def _apply_awq(cfg: ModelConfig, i: int, weights: dict, inputs: dict, bits: int, plan: Plan) -> None:
    """Search and fold layer ``i``'s scaling factors (its groups in order: a v_proj scaled as a linear of
    q/k/v is then divided as the previous tensor of o)."""
    group = GROUP if bits == 4 else None
    for sg in _scaling_groups(cfg, i, weights):
        x = inputs[sg.name]
        s, alpha = _search_scale(x, [weights[n] for n in sg.linears], bits, group, sg.tie)
        plan.alphas[sg.name] = alpha
        if alpha is None:
            continue
        plan.scales[sg.name] = s.numpy()
        for n in sg.linears:
            weights[n] = weights[n] * s[None, :]
        prev = sg.for_previous(s)
        for n in sg.previous:  # a (C,) norm weight/bias or the (C, K) rows of v_proj / up_proj
            weights[n] = weights[n] / (prev if weights[n].dim() == 1 else prev[:, None])
        inputs[sg.name] = x / s[None, :]  # what the linears now read (the clip search uses it)


def _search_scale(x: torch.Tensor, ws: list[torch.Tensor], bits: int, group: int | None, tie=lambda v: v
                  ) -> tuple[torch.Tensor, float | None]:
    """The per-input-channel factor with the smallest output error after quantization; (ones, None) when
    no factor beats the plain weights. ``tie`` makes the statistics (so the factors) equal where they must
    be."""
    w = torch.cat(ws)
    n, k = w.shape
    g = group or k
    x_mean = x.abs().mean(0)  # the statistic from every calibration token; the error from a spread subset
    x = _spread(x, SEARCH_TOKENS)
    ref = x @ w.T
    wg = w.abs().view(n, k // g, g)
    w_mean = tie((wg / wg.amax(-1, keepdim=True).clamp(min=1e-12)).view(n, k).mean(0))
    x_mean = tie(x_mean)
    best_loss = float(((x @ fake_quantize(w, bits, group).T) - ref).pow(2).mean())
    best = (torch.ones(k), None)
    for alpha in ALPHAS:
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the range: the product of max and min is 1
        loss = float(((x @ (fake_quantize(w * s[None, :], bits, group) / s[None, :]).T) - ref).pow(2).mean())
        if loss < best_loss:
            best_loss, best = loss, (s, alpha)
    return best


def _spread(x: torch.Tensor, n: int) -> torch.Tensor:
    """Up to ``n`` rows of ``x`` spread evenly over it (both languages, every part of the texts)."""
    return x if len(x) <= n else x[torch.linspace(0, len(x) - 1, n).long()]


def _search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, g: int, *, tokens: int = SEARCH_TOKENS,
                 rows: int = 1024) -> torch.Tensor:
    """Per (row, group): the clip ratio of max|w| whose quantized group gives the smallest error on
    that group's share of the output, over up to ``tokens`` calibration tokens."""
    n, k = w.shape
    x = _spread(x, tokens)
    xg = x.view(len(x), k // g, g).transpose(0, 1)  # (G, T, g)
    best = torch.ones(n, k // g)
    for a in range(0, n, rows):  # rows at a time: the error table is T x rows x G
        wg = w[a:a + rows].view(-1, k // g, g).transpose(0, 1)  # (G, R, g)
        ref = xg @ wg.transpose(1, 2)  # (G, T, R)
        amax = wg.abs().amax(-1)  # (G, R)
        best_err = torch.full_like(amax, float("inf"))
        for r in CLIP_RATIOS:
            m = amax * r
            scale = (m / ((1 << (bits - 1)) - 1)).half().float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.clamp(torch.round(torch.clamp(wg, -m[..., None], m[..., None]) / scale[..., None]),
                            -(1 << (bits - 1)), (1 << (bits - 1)) - 1) * scale[..., None]
            err = (xg @ q.transpose(1, 2) - ref).pow(2).mean(1)  # (G, R)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[a:a + rows] = torch.where(better.T, torch.full_like(best[a:a + rows], r), best[a:a + rows])
    return best


# ------------------------------------------------------------------------------------------- the record
def _record(cfg, request, quantized, plan, calibration, seconds) -> dict:
    widths: dict[str, int] = {}
    for q in quantized.values():
        widths[str(q.bits)] = widths.get(str(q.bits), 0) + 1
    nbytes = sum(q.codes.size * q.bits // 8 + q.scales.size * 2 for q in quantized.values())  # fp16 scales
    record = {"precision": request.precision, "layout": LAYOUT, "method": request.method, "bits": request.bits,
              "group": GROUP if request.bits == 4 else "per-channel", "head": request.head,
              "head_bits": 8 if request.head == "int8" else 16, "block_size": GROUP if request.bits == 4 else None,
              "tensors": len(quantized), "tensors_by_bits": widths,
              "quantized_params": int(sum(q.codes.size for q in quantized.values())),
              "quantized_bytes": int(nbytes), "seconds": round(seconds, 2)}
    if request.bits == 4 and request.int8_share > 0:
        int8 = sorted(n for n, q in quantized.items() if q.bits == 8 and n in plan.bits and n.startswith("layers."))
        params = sum(quantized[n].codes.size for n in int8)
        linears = sum(q.codes.size for n, q in quantized.items() if n.startswith("layers."))
        record["int8_share"] = {"asked": request.int8_share, "got": round(params / linears, 4), "tensors": int8}
    if calibration is not None:
        applied = [a for a in plan.alphas.values() if a is not None]
        clips = np.concatenate([c.reshape(-1) for c in plan.clips.values()]) if plan.clips else np.ones(1)
        record["calibration"] = {"texts": calibration.description, "tokens": calibration.tokens}
        record["awq"] = {
            "scaling_groups": len(plan.alphas), "scaled": len(applied),
            "alpha": {name: a for name, a in plan.alphas.items()},
            "scale_range": {name: [round(float(s.min()), 4), round(float(s.max()), 4)]
                            for name, s in plan.scales.items()},
            "clip": {"tensors": len(plan.clips), "groups_clipped": round(float((clips < 1).mean()), 4),
                     "mean_ratio": round(float(clips.mean()), 4),
                     "per_tensor_mean": {n: round(float(c.mean()), 4) for n, c in plan.clips.items()}},
            "plan_file": "plan.safetensors"}
    return record


def plan_arrays(plan: Plan) -> dict[str, np.ndarray]:
    """plan.safetensors: ``scale.{group}`` (K,) float32 and ``clip.{tensor}`` (N, K/128) float32."""
    out = {f"scale.{k}": np.asarray(v, np.float32) for k, v in plan.scales.items()}
    out.update({f"clip.{k}": np.asarray(v, np.float32) for k, v in plan.clips.items()})
    return out


def _linear_names(cfg: ModelConfig) -> list[str]:
    from .quantize import linear_names

    return linear_names(cfg)
