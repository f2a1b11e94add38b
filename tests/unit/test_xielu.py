import pytest
import torch

from lexfine.kernels.xielu import patch_xielu, xielu_math


def _reference():
    from transformers.activations import XIELUActivation

    torch.manual_seed(0)
    act = XIELUActivation(dtype=torch.float32)
    with torch.no_grad():
        act.alpha_p.add_(0.1)
        act.alpha_n.sub_(0.2)
    return act


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_matches_reference_forward_and_backward(dtype, tol):
    ref = _reference()
    x = (torch.randn(4, 33, 64) * 3).to(dtype)
    x[0, 0, :4] = torch.tensor([0.0, -1e-7, 1e-7, -50.0])  # the branch point, eps and saturation

    x1 = x.clone().requires_grad_(True)
    ref_out = ref._xielu_python(x1.float())
    ref_out.sum().backward()

    x2 = x.clone().requires_grad_(True)
    out = xielu_math(x2, ref.alpha_p, ref.alpha_n, ref._beta_scalar, ref._eps_scalar)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref_out.detach(), rtol=tol, atol=tol)
    grads_ref = [x1.grad.float(), ref.alpha_p.grad.clone(), ref.alpha_n.grad.clone()]
    ref.alpha_p.grad = ref.alpha_n.grad = None
    out.float().sum().backward()
    torch.testing.assert_close(x2.grad.float(), grads_ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(ref.alpha_p.grad, grads_ref[1], rtol=1e-3, atol=1e-3 * grads_ref[1].abs().max().item())
    torch.testing.assert_close(ref.alpha_n.grad, grads_ref[2], rtol=1e-3, atol=1e-3 * grads_ref[2].abs().max().item())


def test_patch_applies_to_apertus_mlp():
    from lexfine import models
    from lexfine.config import ModelArgs
    from tests.conftest import tiny_arch

    model = models.load_model("random:apertus-8b", ModelArgs(arch_overrides=tiny_arch(), dtype="float32"))
    ids = torch.randint(0, 1000, (2, 17))
    before = model(ids).logits
    assert patch_xielu(model, backend="aot_eager") == 2  # one per layer
    after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
