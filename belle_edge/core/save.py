"""Writing a checkpoint (pruned, fine-tuned, distilled, a converted GGUF) as a stock Hugging Face directory,
whole or not at all.

``config.json`` + ``model.safetensors`` in the family's own names and layout (BLOOM's QKV re-fused), the
tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the chat template), and the records of how it
was made (``pruning.json``, ``training.json``), through :func:`~.folders.staged_folder`.
"""
from __future__ import annotations

import json
import os

from ..models import family
from .checkpoint import Checkpoint
from .folders import staged_folder


def save_checkpoint(ckpt: Checkpoint, out: str, *, records: dict[str, dict] | None = None, force: bool = False,
                    tokenizer_config: dict | None = None) -> str:
    """Write ``ckpt`` to ``out``; ``records`` maps file names (``pruning.json``) to what they hold.
    ``tokenizer_config`` replaces :func:`source_tokenizer_config` (a pruned vocabulary re-keys its ids)."""
    from safetensors.torch import save_file

    out = os.path.abspath(os.path.expanduser(out))
    with staged_folder(out, force=force) as work:
        fam = family(ckpt.config.family)
        state = {k: v.contiguous() for k, v in fam.state_dict_to_hf(ckpt.state_dict, ckpt.config).items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")  # what the file really holds
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump({**fam.hf_config(ckpt.config), "torch_dtype": dtype}, f, indent=1)
        save_file(state, os.path.join(work, "model.safetensors"), metadata={"format": "pt"})
        ckpt.tokenizer.save(os.path.join(work, "tokenizer.json"))
        config = tokenizer_config if tokenizer_config is not None else source_tokenizer_config(ckpt)
        with open(os.path.join(work, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(with_chat_format(config, ckpt), f, indent=1, ensure_ascii=False)
        for name, record in (records or {}).items():
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, ensure_ascii=False)
    return out


def source_tokenizer_config(ckpt: Checkpoint) -> dict:
    """The ``tokenizer_config.json`` of the folder the checkpoint was read from ({} for a GGUF file)."""
    src = os.path.join(ckpt.source, "tokenizer_config.json") if os.path.isdir(ckpt.source) else None
    if src and os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            return json.load(f)
    return {}


def with_chat_format(config: dict, ckpt: Checkpoint) -> dict:
    """``config`` naming the checkpoint's chat template and BOS/EOS tokens, as our loader and transformers read them."""
    cfg = dict(config)
    fmt = ckpt.chat_format.to_dict()
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if fmt.get("kind") == "template":
        cfg["chat_template"] = fmt["template"]
    for key in ("bos_token", "eos_token"):
        if fmt.get(key) and not cfg.get(key):
            cfg[key] = fmt[key]
    return cfg
