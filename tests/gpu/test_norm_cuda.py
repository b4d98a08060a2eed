"""The fused residual add + RMSNorm kernel (kernels/src/norm.cu) against the torch reference on CUDA."""
import pytest
import torch

from belle_edge.ops.norm import add_rms_norm, reference_add_rms_norm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("rows,width", [(1, 896), (4, 3072), (70, 8192), (3, 16384), (2, 136)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_the_reference(dtype, atol, rows, width, with_delta):
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    delta = torch.randn(rows, width, device="cuda", dtype=dtype) if with_delta else None
    w = torch.rand(width, device="cuda", dtype=dtype) + 0.5
    h, y = add_rms_norm(x, delta, w, 1e-6)
    ref_h = x if delta is None else x + delta  # the add rounded once, as the model's
    _, ref_y = reference_add_rms_norm(ref_h.float(), None, w.float(), 1e-6)
    assert torch.equal(h, ref_h)
    assert (y.float() - ref_y).abs().max().item() < atol
