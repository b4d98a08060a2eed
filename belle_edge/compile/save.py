"""Writing a checkpoint (pruned, fine-tuned, distilled) as a stock Hugging Face directory, whole or not at all.

``config.json`` + ``model.safetensors`` in the family's own names and layout (BLOOM's QKV re-fused), the
tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the chat template), and the records of how it
was made (``pruning.json``, ``training.json``). Everything is written to a hidden sibling folder that is renamed into place
last: an interrupted prune leaves no folder that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

from ..errors import InputError
from ..models import family
from .pipeline import move_into_place


def save_checkpoint(ckpt, out: str, *, records: dict[str, dict] | None = None, force: bool = False,
                    trim=None) -> str:
    """Write ``ckpt`` to ``out``; ``records`` maps file names (``pruning.json``) to what they hold; ``trim``
    (a VocabTrim) re-keys the source's tokenizer_config ids when the vocabulary shrank."""
    from safetensors.torch import save_file

    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and not force:
        raise InputError(f"{out}: already exists; pass --force to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.partial-")
    try:
        fam = family(ckpt.config.family)
        state = {k: v.contiguous() for k, v in fam.state_dict_to_hf(ckpt.state_dict, ckpt.config).items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")  # what the file really holds
        with open(os.path.join(work, "config.json"), "w") as f:
            json.dump({**fam.hf_config(ckpt.config), "torch_dtype": dtype}, f, indent=1)
        save_file(state, os.path.join(work, "model.safetensors"), metadata={"format": "pt"})
        ckpt.tokenizer.save(os.path.join(work, "tokenizer.json"))
        with open(os.path.join(work, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(_tokenizer_config(ckpt, trim), f, indent=1, ensure_ascii=False)
        for name, record in (records or {}).items():
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, ensure_ascii=False)
        move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _tokenizer_config(ckpt, trim) -> dict:
    """The source's tokenizer_config.json (ids re-keyed when the vocabulary shrank), else one made from the
    chat format; either way it names the chat template and the BOS/EOS tokens our loader and transformers read."""
    cfg = {}
    src = os.path.join(ckpt.source, "tokenizer_config.json") if os.path.isdir(ckpt.source) else None
    if src and os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            cfg = json.load(f)
        if trim is not None:
            from ..prune.vocab import remap_tokenizer_config

            cfg = remap_tokenizer_config(cfg, trim)
    fmt = ckpt.chat_format.to_dict()
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if fmt.get("kind") == "template":
        cfg["chat_template"] = fmt["template"]
    for key in ("bos_token", "eos_token"):
        if fmt.get(key) and not cfg.get(key):
            cfg[key] = fmt[key]
    return cfg
