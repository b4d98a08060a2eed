"""The torch backend on a CUDA GPU: the same logits and replies as the CPU reference.

Runs only where CUDA is available (the lent GPU machines, a user's workstation); skips with the reason
elsewhere. fp32 on the GPU must match the CPU closely; half precision within its rounding.
"""
import numpy as np
import pytest
import torch

from belle_edge.api import torch_chat_model
from belle_edge.core.load import load_checkpoint
from belle_edge.mask import MaskConfig
from belle_edge.models.decoder import Decoder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

MESSAGES = ["你好", "订单已经发货了吗？", "Hello! How can I help you?", "请提供您的订单号。", "谢谢你的帮助！"]


def _dialogue_logits(decoder, ids, mask):
    t = ids.shape[1]
    turns = np.repeat(np.arange(1, 5), -(-t // 4))[:t]
    with torch.no_grad():
        return decoder(ids.to(decoder.embed.weight.device), np.arange(t), turns, mask).float().cpu()


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_bloom_dir"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1), (torch.float16, 2e-2)])
def test_cuda_logits_match_the_cpu_reference(request, which, dtype, atol):
    ckpt = load_checkpoint(request.getfixturevalue(which))
    cpu = Decoder.from_state_dict(ckpt.config, ckpt.state_dict)
    gpu = Decoder.from_state_dict(ckpt.config, ckpt.state_dict, dtype=dtype, device="cuda")
    ids = torch.randint(0, ckpt.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    for mask in (MaskConfig.off(), MaskConfig(window=1, sinks=4)):
        ref = _dialogue_logits(cpu, ids, mask)
        got = _dialogue_logits(gpu, ids, mask)
        err = (ref - got).abs().max().item()
        print(f"{which} {dtype} window={mask.window}: max |cuda - cpu| = {err:.2e}")
        assert err < atol


def test_a_cuda_session_replies_as_the_cpu_session(tiny_llama_dir):
    ckpt = load_checkpoint(tiny_llama_dir)
    cpu = torch_chat_model(ckpt).session(window=1, sinks=2, max_new_tokens=12)
    gpu = torch_chat_model(ckpt, device="cuda").session(window=1, sinks=2, max_new_tokens=12)
    for m in MESSAGES:
        a, b = cpu.send(m), gpu.send(m)
        assert a.text == b.text and a.stats.kv_tokens == b.stats.kv_tokens
    print(f"cuda session: {len(MESSAGES)} turns identical to cpu; last decode {b.stats.decode_tok_s:.0f} tok/s")
