"""Shared fixtures: a byte-level BPE tokenizer trained here, tiny random LLaMA (GQA) and BLOOM checkpoints
written as real Hugging Face directories, and the real models (SmolLM2-135M and the default Qwen2.5-0.5B,
each loaded once per test run)."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import pytest

CORPUS = [
    "你好！请问有什么可以帮您？订单已经发货了，预计三天内送达。",
    "您好，这件商品支持七天无理由退货。请提供您的订单号。",
    "谢谢你的帮助！我想查询一下物流信息。快递单号是多少？",
    "Hello! How can I help you today? Your order has shipped.",
    "The capital of France is Paris. Please introduce yourself.",
    "客服：好的，我马上为您处理。请稍等。Human: Assistant:",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    """Tests convert the default GGUF once into their own cache (so the conversion itself is tested), and
    every later load in the run, subprocesses included, reads that cache; the user's cache is not touched."""
    path = str(tmp_path_factory.mktemp("belle_edge_cache"))
    old = os.environ.get("BELLE_EDGE_CACHE")
    os.environ["BELLE_EDGE_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("BELLE_EDGE_CACHE", None)
    else:
        os.environ["BELLE_EDGE_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _write_tokenizer(path, tokenizer, *, chat_template: str | None, eos: str):
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    cfg = {"eos_token": eos, "bos_token": "<|im_start|>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)


def make_tiny_llama(path, tokenizer, *, layers=2, max_positions=512, tie=False, chat_template=CHATML, seed=0,
                    hidden=64, intermediate=128):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.token_to_id("<|im_end|>")
    cfg = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie, eos_token_id=eos,
                      bos_token_id=tokenizer.token_to_id("<|im_start|>"), rope_theta=10000.0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    _write_tokenizer(path, tokenizer, chat_template=chat_template, eos="<|im_end|>")
    return model


def make_tiny_qwen2(path, tokenizer, *, layers=2, max_positions=512, tie=True, heads=4, kv_heads=2, head_dim=16,
                    seed=0, intermediate=96):
    """Qwen2's traits at a tiny size: q/k/v biases (none on o_proj), a tied head, RoPE base 1e6, ChatML."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=heads * head_dim,
                      intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6,
                      rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
                      eos_token_id=tokenizer.token_to_id("<|im_end|>"), bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases, so a lost or misplaced bias shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(std=0.2)
    model.save_pretrained(path)
    _write_tokenizer(path, tokenizer, chat_template=CHATML, eos="<|im_end|>")
    return model


def make_tiny_bloom(path, tokenizer, *, layers=2, heads=6, head_dim=16, seed=0):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=head_dim * heads, n_layer=layers, n_head=heads,
                      eos_token_id=tokenizer.token_to_id("<|endoftext|>"), bos_token_id=None)
    model = BloomForCausalLM(cfg).eval()
    model.save_pretrained(path)
    _write_tokenizer(path, tokenizer, chat_template=None, eos="<|endoftext|>")
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    make_tiny_llama(path, tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory, tiny_tokenizer):
    path = str(tmp_path_factory.mktemp("tiny_bloom"))
    make_tiny_bloom(path, tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer):
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    make_tiny_qwen2(path, tiny_tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_llama_model(tiny_llama_dir):
    from belle_edge import load

    return load(tiny_llama_dir)


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """SmolLM2-135M, named: the small real model most tests use (the default model is Qwen2.5-0.5B)."""
    from belle_edge.core.load import load_checkpoint

    return load_checkpoint("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_model(smollm2_checkpoint):
    from belle_edge.api import torch_chat_model
    from belle_edge.known_models import MODELS

    return torch_chat_model(smollm2_checkpoint, name=MODELS["smollm2-135m"].title)



@contextlib.contextmanager
def serving(app):
    """uvicorn running ``app`` in a thread on a free port; yields its base URL. Leaving shuts it down (the
    app's lifespan closes its engine). For the server's tests (test_serve.py, test_chat_page.py)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()
