"""Loaders: what they accept, and the one-line errors for what they refuse."""
import json
import os
import shutil

import pytest
import torch

from belle_edge.core.load import load_checkpoint
from belle_edge.errors import CheckpointError, InputError, UnsupportedModelError
from belle_edge.runtime.chat_format import BelleFormat, TemplateFormat


@pytest.fixture
def llama_copy(tmp_path, tiny_llama_dir):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, path)
    return path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_hf_directory_loads_with_its_chat_template(tiny_llama_dir, tiny_bloom_dir):
    llama = load_checkpoint(tiny_llama_dir)
    assert llama.kind == "hf" and llama.config.family == "llama" and llama.config.num_kv_heads == 2
    assert isinstance(llama.chat_format, TemplateFormat)
    assert llama.tokenizer.token_to_id("<|im_end|>") in llama.stop_token_ids
    bloom = load_checkpoint(tiny_bloom_dir)  # no template: BELLE's format, "Human:" stops
    assert isinstance(bloom.chat_format, BelleFormat) and "Human:" in bloom.chat_format.stop_strings
    assert load_checkpoint(tiny_llama_dir, chat_format="belle-v2").chat_format.name == "belle-v2"


def test_load_rejects_a_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(str(tmp_path / "nope"))


def test_load_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(CheckpointError, match="expected config.json or one .gguf"):
        load_checkpoint(str(tmp_path))


def test_load_rejects_corrupt_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="config.json: not readable JSON"):
        load_checkpoint(str(llama_copy))


def test_load_rejects_an_unknown_architecture(llama_copy):
    _edit_config(llama_copy, model_type="gpt_neox")
    with pytest.raises(UnsupportedModelError, match="'gpt_neox' is not supported; supported: llama, bloom"):
        load_checkpoint(str(llama_copy))


def test_load_rejects_a_config_that_contradicts_its_weights(llama_copy):
    _edit_config(llama_copy, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"config contradicts weights: .*mlp.* should be \[96, 64\].*got \[128, 64\]"):
        from belle_edge import load

        load(str(llama_copy))


def test_load_rejects_missing_weights(llama_copy):
    from safetensors.torch import load_file, save_file

    f = llama_copy / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(f))
    with pytest.raises(CheckpointError, match="weights missing .*layers.1.mlp.up_proj.weight"):
        from belle_edge import load

        load(str(llama_copy))


def test_load_rejects_a_truncated_safetensors_file(llama_copy):
    f = llama_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(str(llama_copy))


def test_pickle_weights_need_an_explicit_opt_in(llama_copy):
    from safetensors.torch import load_file

    state = load_file(str(llama_copy / "model.safetensors"))
    os.remove(llama_copy / "model.safetensors")
    torch.save(state, llama_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unpickling can run code; pass --allow-pickle"):
        load_checkpoint(str(llama_copy))
    ckpt = load_checkpoint(str(llama_copy), allow_pickle=True)
    assert torch.equal(ckpt.state_dict["embed.weight"], state["model.embed_tokens.weight"])


def test_load_rejects_a_missing_tokenizer(llama_copy):
    os.remove(llama_copy / "tokenizer.json")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_checkpoint(str(llama_copy))


def test_load_rejects_a_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match=r"not a GGUF file \(expected magic b'GGUF'"):
        load_checkpoint(str(f))


def test_load_rejects_a_truncated_gguf(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.gguf: not a usable GGUF checkpoint"):
        load_checkpoint(str(f))


def test_template_format_is_refused_without_a_template(tiny_bloom_dir):
    with pytest.raises(InputError, match="has no chat template"):
        load_checkpoint(tiny_bloom_dir, chat_format="template")


def test_an_unknown_device_is_refused(tiny_llama_dir):
    from belle_edge import load

    with pytest.raises(InputError, match="device 'bogus'"):
        load(tiny_llama_dir, device="bogus")
