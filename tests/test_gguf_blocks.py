"""A GGUF's own blocks as MatMulNBits blocks (compile/quantize.py): every type we carry decodes to exactly
what gguf-py's reference dequantizer gives, on random blocks of every byte pattern (the scales set to finite
fp16 values), so carrying them over never rounds a second time."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from belle_edge.compile.quantize import GGUF_TYPES, _decode_blocks

# bytes per block, and where its fp16 scales sit
LAYOUT = {"Q4_0": (18, (0,)), "Q4_1": (20, (0, 2)), "Q5_0": (22, (0,)), "Q8_0": (34, (0,)),
          "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
ELEMENTS = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_carried_blocks_decode_exactly(qtype):
    rng = np.random.default_rng(0)
    size, scales = LAYOUT[qtype]
    rows, blocks = 6, 3
    data = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for at in scales:  # finite, non-zero scales (random bytes could spell inf or NaN)
        value = rng.uniform(0.01, 0.2, (rows, blocks)).astype(np.float16) * rng.choice([-1, 1], (rows, blocks))
        data[..., at:at + 2] = value.astype(np.float16)[..., None].view(np.uint8)
    data = data.reshape(rows, blocks * size)
    ref = dequantize(data, getattr(GGMLQuantizationType, qtype)).reshape(rows, -1)
    q = _decode_blocks(data, qtype)
    assert q.shape == (rows, blocks * ELEMENTS.get(qtype, 32)) and q.source == f"gguf:{qtype}"
    np.testing.assert_allclose(q.dequantize(), ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))
    assert q.bits in (4, 8) and q.codes.max() < (1 << q.bits) and q.block_size in (16, 32)
