import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from explanations import build_objective
from explanations.fast_batchnorm import FastBatchNorm2d, _BatchNormTrain, use_fast_batchnorm


def make_net(dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=2.0),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=2.0),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    )
    with torch.no_grad():  # non-trivial affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.to(dtype).train()


def batch(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(5, 3, 6, 6, generator=gen, dtype=dtype), torch.tensor([0, 1, 2, 0, 1])


def test_conversion_keeps_parameters_buffers_and_type():
    net = make_net()
    keys = list(net.state_dict())
    assert use_fast_batchnorm(net) == 2
    assert all(isinstance(m, FastBatchNorm2d) and isinstance(m, nn.BatchNorm2d) for m in (net[1], net[4]))
    assert list(net.state_dict()) == keys
    sync = nn.SyncBatchNorm(4)
    assert use_fast_batchnorm(nn.Sequential(sync)) == 0 and type(sync) is nn.SyncBatchNorm


@pytest.mark.parametrize("name", ["r2et", "r2et_noh", "grad_norm"])
def test_double_backprop_matches_pytorch_in_float64(name):
    ref, fast = make_net(), make_net()
    use_fast_batchnorm(fast)
    x, y = batch()
    objective = build_objective(name, k=8)
    out_ref, out_fast = objective(ref, x, y), objective(fast, x, y)
    torch.testing.assert_close(out_fast.loss, out_ref.loss, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(out_ref.loss, list(ref.parameters()))
    g_fast = torch.autograd.grad(out_fast.loss, list(fast.parameters()))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(ref.modules(), fast.modules()):  # running statistics move identically
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(b.running_mean, a.running_mean)
            torch.testing.assert_close(b.running_var, a.running_var)
            assert int(b.num_batches_tracked) == int(a.num_batches_tracked)


def test_weight_gradient_paths_match_pytorch():
    """Differentiating the parameter gradients too (MAML-style) exercises gg_gamma and gg_beta."""
    ref, fast = make_net(), make_net()
    use_fast_batchnorm(fast)
    x, y = batch()

    def second_order(net):
        xv = x.clone().requires_grad_(True)
        ce = nn.functional.cross_entropy(net(xv), y)
        grads = torch.autograd.grad(ce, [xv, *net.parameters()], create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in grads), list(net.parameters()))

    for a, b in zip(second_order(fast), second_order(ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradgradcheck_and_third_derivative_refused():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_(True)

    def fn(x, w, b):
        return _BatchNormTrain.apply(x, w, b, None, None, 0.0, 1e-5)

    assert gradcheck(fn, (x, w, b), fast_mode=True) and gradgradcheck(fn, (x, w, b), fast_mode=True)
    (g,) = torch.autograd.grad(fn(x, w, b).pow(3).sum(), x, create_graph=True)
    torch.autograd.grad(g.pow(2).sum(), x, retain_graph=True)  # second derivative: fine
    with pytest.raises(RuntimeError, match="second derivatives"):  # graph of it (third): refused
        torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)


def test_eval_mode_and_no_grad_use_pytorch_path():
    net = make_net()
    use_fast_batchnorm(net)
    x, _ = batch()
    net.eval()
    assert net[1](net[0](x)).grad_fn.name() != "_BatchNormTrainBackward"
    net.train()
    with torch.no_grad():
        assert net(x).grad_fn is None
    assert net[1](net[0](x)).grad_fn.name() == "_BatchNormTrainBackward"


def test_bf16_autocast_is_as_accurate_as_pytorch_batchnorm():
    ref, fast, exact = make_net(torch.float32), make_net(torch.float32), make_net(torch.float32)
    use_fast_batchnorm(fast)
    x, y = batch(torch.float32)
    objective = build_objective("r2et_noh", k=8)

    def flat_grad(net, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = objective(net, x, y).loss
        assert torch.isfinite(loss)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])

    truth = flat_grad(exact, False)
    err_fast = ((flat_grad(fast, True) - truth).norm() / truth.norm()).item()
    err_ref = ((flat_grad(ref, True) - truth).norm() / truth.norm()).item()
    # PyTorch's own bf16 error depends on the CPU's bf16 kernels (0.115 here for both paths; under 0.03 on the machine where this bound was set):
    # the claim is relative to it; err_ref > 0 shows autocast really ran in bf16
    assert 0 < err_ref < 0.25, err_ref
    assert err_fast < 1.5 * err_ref + 1e-3, (err_fast, err_ref)  # (fast: fp32 math inside)
