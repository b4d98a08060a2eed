"""Helpers shared by the family modules for mapping checkpoint names and config fields."""
from __future__ import annotations

from ..errors import CheckpointError


def require(hf: dict, key: str, where: str):
    if key not in hf or hf[key] is None:
        raise CheckpointError(f"{where}: config field {key!r} is missing")
    return hf[key]


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def rename_layers(sd: dict, names: dict, layer_names: dict, layer_prefix: tuple[str, str], num_layers: int,
                  *, to_canonical: bool) -> tuple[dict, set]:
    """Rename ``sd`` between canonical and checkpoint names; returns (renamed, names left unmatched).

    ``names`` and ``layer_names`` map canonical -> checkpoint; ``layer_prefix`` is (canonical, checkpoint)
    with ``{i}`` for the layer index. Names absent from ``sd`` (optional biases) are simply skipped.
    """
    table = dict(names)
    for i in range(num_layers):
        cp, hp = (p.format(i=i) for p in layer_prefix)
        table.update({cp + c: hp + h for c, h in layer_names.items()})
    if to_canonical:
        table = {h: c for c, h in table.items()}
    out = {table[k]: v for k, v in sd.items() if k in table}
    leftover = set(sd) - set(table)
    return out, leftover


def split_fused(tensor, parts: int, heads: int, where: str, name: str):
    """Split a fused per-head [heads, parts, ...] projection (BLOOM's interleaved QKV) into ``parts`` tensors."""
    if tensor.shape[0] % (heads * parts):
        raise CheckpointError(f"{where}: {name} has {tensor.shape[0]} rows, not divisible by {parts} x {heads} heads")
    head_dim = tensor.shape[0] // (heads * parts)
    view = tensor.reshape(heads, parts, head_dim, *tensor.shape[1:])
    return [view[:, j].reshape(heads * head_dim, *tensor.shape[1:]).contiguous() for j in range(parts)]
