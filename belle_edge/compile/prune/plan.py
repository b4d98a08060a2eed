"""The target solver: from a parameter budget to the shape of the pruned model, printed before it is made.

Three knobs, each with its own granularity:

* **vocabulary**: fixed by the corpus (the tokens it uses, plus specials and the chat format's tokens);
* **depth**: whole layers;
* **width**: one scale ``s`` applied to the residual stream, the MLP and the heads. LLaMA keeps its head
  size (RoPE pairs dims within a head) and loses whole query heads per KV group or whole KV groups; BLOOM
  keeps every head, and with it every head's ALiBi slope, and shrinks the head size, because stock
  transformers ties BLOOM's hidden size to heads x head size and its MLP to 4 x hidden and derives the
  slopes from the head count.

Shapes are uniform across layers: that is what a stock ``config.json`` can describe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import InputError
from ...models.config import ModelConfig

MODES = ("mix", "width", "depth")
TOLERANCE = 0.02  # the plan's parameter count must land within 2% of the target


@dataclass(frozen=True)
class Shape:
    vocab: int
    layers: int
    hidden: int
    kv_heads: int
    group: int          # query heads per KV head
    head_dim: int
    intermediate: int


def shape_of(cfg: ModelConfig) -> Shape:
    return Shape(cfg.vocab_size, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.group_size, cfg.head_dim,
                 cfg.intermediate_size)


def config_for(cfg: ModelConfig, s: Shape) -> ModelConfig:
    return cfg.replace(vocab_size=s.vocab, num_layers=s.layers, hidden_size=s.hidden, num_kv_heads=s.kv_heads,
                       num_heads=s.kv_heads * s.group, head_dim=s.head_dim, intermediate_size=s.intermediate)


def shrinks_head_dim(cfg: ModelConfig) -> bool:
    """BLOOM checkpoints: hidden = heads x head_dim and intermediate = 4 x hidden are fixed by the format."""
    return cfg.family == "bloom"


def count_params(cfg: ModelConfig) -> int:
    """Exact parameter count of the canonical model of ``cfg`` (built on the meta device: no memory)."""
    import torch

    from ...models.decoder import Decoder

    with torch.device("meta"):
        model = Decoder(cfg)
    return sum(p.numel() for p in model.parameters())


def _round_to(x: float, multiple: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(round(x / multiple)) * multiple or multiple))


def _hidden_step(cfg: ModelConfig, heads: int, multiple: int) -> int:
    """LLaMA hidden sizes move in multiples of the head count (transformers' LlamaConfig refuses others, even
    with head_dim given) and of ``multiple`` where that is not too coarse."""
    m = math.lcm(multiple, heads)
    return m if m <= cfg.hidden_size // 4 else heads


def width_shape(cfg: ModelConfig, s: float, *, vocab: int, layers: int, multiple: int) -> Shape:
    """The shape at width scale ``s`` (0 < s <= 1)."""
    if shrinks_head_dim(cfg):
        d = max(1, min(cfg.head_dim, round(s * cfg.head_dim)))
        hidden = cfg.num_heads * d
        return Shape(vocab, layers, hidden, cfg.num_kv_heads, cfg.group_size, d, 4 * hidden)
    want = s * cfg.num_heads
    kv, group = min(((k, g) for k in range(1, cfg.num_kv_heads + 1) for g in range(1, cfg.group_size + 1)),
                    key=lambda kg: (abs(kg[0] * kg[1] - want), -kg[0], -kg[1]))
    # transformers' LlamaConfig refuses a hidden size that is not a multiple of the head count (even with
    # head_dim given); within that, a multiple of `multiple` where it is not too coarse
    heads = kv * group
    m = _hidden_step(cfg, heads, multiple)
    hidden = _round_to(s * cfg.hidden_size, m, m, cfg.hidden_size // heads * heads)
    inter = _round_to(s * cfg.intermediate_size, min(multiple, cfg.intermediate_size), 1, cfg.intermediate_size)
    return Shape(vocab, layers, hidden, kv, group, cfg.head_dim, inter)


@dataclass(frozen=True)
class Plan:
    mode: str
    source: ModelConfig
    shape: Shape
    target: int
    params_before: int
    params_after: int

    @property
    def config(self) -> ModelConfig:
        return config_for(self.source, self.shape)

    @property
    def deviation(self) -> float:
        return self.params_after / self.target - 1

    def to_dict(self) -> dict:
        import dataclasses

        return {"mode": self.mode, "target_params": self.target, "params_before": self.params_before,
                "params_after": self.params_after, "deviation": round(self.deviation, 5),
                "shape_before": dataclasses.asdict(shape_of(self.source)),
                "shape_after": dataclasses.asdict(self.shape)}


def _fit_width(cfg: ModelConfig, target: int, *, vocab: int, layers: int, multiple: int) -> Shape:
    """Largest width whose count does not pass the target, then the MLP width tuned to land on it."""
    def params(shape):
        return count_params(config_for(cfg, shape))

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if params(width_shape(cfg, mid, vocab=vocab, layers=layers, multiple=multiple)) <= target:
            lo = mid
        else:
            hi = mid
    shape = width_shape(cfg, max(lo, 1e-6), vocab=vocab, layers=layers, multiple=multiple)
    if shrinks_head_dim(cfg):  # one knob (head size): take whichever neighbour lands nearer the target
        up = width_shape(cfg, hi, vocab=vocab, layers=layers, multiple=multiple)
        return min((shape, up), key=lambda s: abs(params(s) - target))
    # The count is affine in the MLP width: for the hidden size just below and just above the bisection's
    # point, solve for the MLP width that lands on the target (on a multiple of `multiple` when that is close
    # enough), then keep the pair whose MLP is cut most like the hidden size.
    fits = []
    heads = shape.kv_heads * shape.group
    bigger = min(shape.hidden + _hidden_step(cfg, heads, multiple), cfg.hidden_size // heads * heads)
    for base in dict.fromkeys((shape, Shape(**{**shape.__dict__, "hidden": bigger}))):
        p1 = params(base)
        per_channel = params(Shape(**{**base.__dict__, "intermediate": base.intermediate + 1})) - p1
        exact = base.intermediate + (target - p1) / per_channel
        for inter in (_round_to(exact, multiple, 1, cfg.intermediate_size),
                      max(1, min(cfg.intermediate_size, round(exact)))):
            candidate = Shape(**{**base.__dict__, "intermediate": inter})
            if abs(params(candidate) / target - 1) <= TOLERANCE / 4:
                fits.append(candidate)
                break
    if not fits:
        return shape
    return min(fits, key=lambda s: abs(s.intermediate / cfg.intermediate_size - s.hidden / cfg.hidden_size))


def solve(cfg: ModelConfig, target: int, mode: str, *, vocab: int | None = None, multiple: int = 8,
          depth_candidates: int = 4) -> list[Plan]:
    """Plans meeting ``target`` parameters. ``mix`` returns several (depth from none to a quarter of the
    layers, width for the rest), to be told apart on calibration text; the others return one."""
    if mode not in MODES:
        raise InputError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")
    before = count_params(cfg)
    if target >= before:
        raise InputError(f"target of {target:,} parameters is not below the model's {before:,}: nothing to prune")
    vocab = cfg.vocab_size if vocab is None or mode != "mix" else vocab
    base = shape_of(cfg)
    if mode == "depth":
        one = count_params(config_for(cfg, Shape(**{**base.__dict__, "layers": 1})))
        if one > target:
            raise InputError(f"target of {target:,} parameters is too small for depth pruning: one layer at full "
                             f"width already has {one:,}")
        per_layer = count_params(config_for(cfg, Shape(**{**base.__dict__, "layers": 2}))) - one
        layers = max(1, min(cfg.num_layers - 1, round(1 + (target - one) / per_layer)))
        shapes = [Shape(**{**base.__dict__, "layers": layers})]
    else:
        drops = [0] if mode == "width" else sorted({round(k * cfg.num_layers / 4 / max(1, depth_candidates - 1))
                                                     for k in range(depth_candidates)})
        shapes = []
        for drop in drops:
            layers = cfg.num_layers - drop
            smallest = width_shape(cfg, 1e-6, vocab=vocab, layers=layers, multiple=multiple)
            if count_params(config_for(cfg, smallest)) > target:
                continue
            shapes.append(_fit_width(cfg, target, vocab=vocab, layers=layers, multiple=multiple))
        if not shapes:
            smallest = width_shape(cfg, 1e-6, vocab=vocab, layers=cfg.num_layers, multiple=multiple)
            raise InputError(f"target of {target:,} parameters is too small for {mode} pruning: the narrowest model "
                             f"it can make has {count_params(config_for(cfg, smallest)):,}")
    plans = [Plan(mode, cfg, s, target, before, count_params(config_for(cfg, s))) for s in dict.fromkeys(shapes)]
    for p in plans:
        assert p.shape.hidden % (p.shape.kv_heads * p.shape.group) == 0, p.shape  # a stock config must hold it
    within = [p for p in plans if abs(p.deviation) <= TOLERANCE]  # e.g. a depth that leaves too little to fill
    return within or [min(plans, key=lambda p: abs(p.deviation))]


def render(plan: Plan, *, layers_kept: list[int] | None = None, extra: list[str] = ()) -> str:
    """The plan as a few lines of text: every dimension before -> after, and the counts."""
    a, b = shape_of(plan.source), plan.shape

    def row(name, x, y):
        return f"  {name:<24}{x:>10,} -> {y:<10,}" + ("" if x == y else f" ({y / x:.0%})")

    lines = [f"prune plan ({plan.mode}):",
             row("vocabulary", a.vocab, b.vocab), row("layers", a.layers, b.layers),
             row("hidden size", a.hidden, b.hidden), row("KV heads per layer", a.kv_heads, b.kv_heads),
             row("query heads per layer", a.kv_heads * a.group, b.kv_heads * b.group),
             row("head size", a.head_dim, b.head_dim), row("MLP width per layer", a.intermediate, b.intermediate)]
    if layers_kept is not None:
        lines.append(f"  layers kept (source index): {layers_kept}")
    lines.append(f"  per layer: q {b.hidden}x{b.kv_heads * b.group * b.head_dim}, k/v {b.hidden}x"
                 f"{b.kv_heads * b.head_dim}, o {b.kv_heads * b.group * b.head_dim}x{b.hidden}, "
                 f"mlp {b.hidden}x{b.intermediate}")
    lines += list(extra)
    lines.append(f"  parameters: {plan.params_before:,} -> {plan.params_after:,} "
                 f"(target {plan.target:,}, {plan.deviation:+.2%}; {plan.params_after / plan.params_before:.1%} "
                 f"of the source)")
    return "\n".join(lines)
