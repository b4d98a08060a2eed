"""``belle-edge compile --dry-run``: what a model would take on its targets, printed before anything is made.

One row per model x precision: parameters, weights as stored, bytes one decode step reads, KV cache and the
total; one column per target: whether that total fits the target's memory, and the bandwidth ceiling on
decode tokens/s. The model is a paper plan (``--shape``, belle_edge/footprint.py) or a checkpoint of which only
the config is read. Nothing is written; the arithmetic is targets.memory_record's.
"""
from __future__ import annotations

from ..default_model import DEFAULT
from ..errors import InputError
from ..footprint import PLANS, plan_config
from ..targets import KERNELS, TARGETS, check_precision, get_target, memory_record

ORIN = ("orin-agx", "orin-nx", "orin-nano")  # the Orin variants, compared side by side


def run_dry_run(args) -> int:
    if args.target_params is not None or args.ratio is not None:
        raise InputError("--dry-run sizes the model as it is: see a prune plan with belle-edge prune --dry-run, "
                         "then size the pruned checkpoint")
    models = _models(args)
    targets = _targets(args)
    precisions = [args.precision] if args.precision else _own_precision(args) or list(targets[0].precisions)
    for target in targets:
        for precision in precisions:
            check_precision(target, precision)
    print(render_table(models, targets, precisions, kv_tokens=args.max_kv_tokens,
                       head=getattr(args, "head", None) or "fp16", block_size=args.block_size))
    return 0


def _models(args) -> list[tuple[str, object]]:
    """(name, ModelConfig) pairs: the paper plans --shape names, or the checkpoint's config alone."""
    if args.shape is not None:
        if args.model is not None:
            raise InputError(f"--shape {args.shape} and a model ({args.model}): give one or the other")
        names = list(PLANS) if args.shape == "all" else [args.shape]
        return [(name, plan_config(name)) for name in names]
    from ..core.load import load_config

    return [(args.model or DEFAULT, load_config(args.model))]


def _own_precision(args) -> list[str]:
    """A quantized checkpoint's precision is its own."""
    from ..core.quantized import is_quantized_checkpoint, quantized_precision

    own = quantized_precision(args.model) if args.model and is_quantized_checkpoint(args.model) else None
    return [own] if own else []


def _targets(args) -> list:
    """The Orin variants side by side when the target is an Orin, or for --shape with the default target
    (cpu: the paper plans are sized for the Orin); otherwise the one target named."""
    target = get_target(args.target)
    if target.name in ORIN or (args.shape is not None and target.name == "cpu"):
        return [TARGETS[name] for name in ORIN]
    return [target]


def table_rows(models, targets, precisions, *, kv_tokens: int = 4096, head: str = "fp16",
               block_size: int = 32) -> list[dict]:
    """One dict per model x precision: the model's figures and, per target, its memory record."""
    rows = []
    for name, cfg in models:
        tokens = min(kv_tokens, cfg.max_positions)
        for precision in precisions:
            records = {t.name: memory_record(t, precision, config=cfg, kv_tokens=tokens, head=head,
                                             block_size=block_size) for t in targets}
            rows.append({"model": name, "config": cfg, "precision": precision, "records": records})
    return rows


def render_table(models, targets, precisions, *, kv_tokens: int = 4096, head: str = "fp16",
                 block_size: int = 32) -> str:
    rows = table_rows(models, targets, precisions, kv_tokens=kv_tokens, head=head, block_size=block_size)
    header = ["model", "precision", "parameters", "weights GiB", "read/token GB", "KV GiB (tokens)", "total GiB"]
    header += [f"{t.name} " + (f"{t.memory_gb:g} GiB" if t.memory_gb else "(RAM)")
               + (f" {t.bandwidth_gbs:g} GB/s" if t.bandwidth_gbs else "") for t in targets]
    lines = []
    for row in rows:
        first = row["records"][targets[0].name]  # the model's own figures are the same for every target here
        cells = [row["model"], row["precision"], f"{first['parameters'] / 1e9:.3f}B", f"{first['weights_gib']:.2f}",
                 f"{first['read_per_token_gb']:.2f}", f"{first['kv_cache_gib']:.2f} ({first['kv_tokens']})",
                 f"{first['total_gib']:.2f}"]
        cells += [_verdict(target, row["records"][target.name]) for target in targets]
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines]
    out += _notes(rows, targets)
    return "\n".join(out)


def _verdict(target, record) -> str:
    """"fits, <= 31.9 tok/s" / "NO, <= 10.6 tok/s": the ceiling is bandwidth / bytes read per token."""
    if not target.memory_gb:
        fit = "RAM not checked"
    else:
        fit = "fits" if record["fits"] else "NO"
    ceiling = record["decode_roofline_tok_s"]
    return f"{fit}, <= {ceiling:.1f} tok/s" if ceiling else f"{fit}, measure tok/s"


def _notes(rows, targets) -> list[str]:
    formats = {}
    for row in rows:
        record = row["records"][targets[0].name]
        formats.setdefault(f"{row['precision']}: {record['weights_format']}", None)
    notes = ["", "weights as stored (norms and biases in the float dtype):"] + [f"  {line}" for line in formats]
    notes.append("read/token: every linear + the LM head + norms, read once per decoded token (an untied input "
                 "embedding is gathered, one row, so it counts in memory only); tok/s = bandwidth / read per "
                 "token, a ceiling")
    notes.append("KV cache: keys and values in half precision (fp32 at fp32) for --max-kv-tokens tokens, or the "
                 "model's positions if fewer")
    if any(t.memory_gb for t in targets):
        notes.append("fits: total against the target's whole memory (targets.py); on a Jetson that memory is "
                     "shared with the OS and the CPU, and no reserve is subtracted here")
    if any(t.gpu for t in targets):
        for name, cfg in dict((row["model"], row["config"]) for row in rows).items():
            why = KERNELS.refusal(head_dim=cfg.head_dim, group=cfg.group_size)
            if why:
                notes.append(f"{name}: {why}, so our attention plugin cannot serve it: compile with "
                             f"--attention native")
    return notes
