import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from explanations import build_objective
from explanations.fast_batchnorm import use_fast_batchnorm
from explanations.lean_layers import LeanConv2d, LeanMaxPool2d, LeanSoftplus, _Conv, _MaxPool, _Softplus, use_lean_layers


def make_net(dtype=torch.float64):
    """Conv-BN-Softplus-MaxPool blocks; threshold=3 so the linear branch of Softplus is exercised."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=2.0, threshold=3.0), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=0.5), nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).to(dtype).train()


def batch(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return 3 * torch.rand(6, 3, 8, 8, generator=gen, dtype=dtype), torch.tensor([0, 1, 2, 0, 1, 2])


def test_conversion_is_in_place_and_keeps_the_state_dict():
    net = make_net()
    keys = list(net.state_dict())
    assert use_lean_layers(net) == 6
    assert isinstance(net[0], LeanConv2d) and isinstance(net[0], nn.Conv2d)
    assert isinstance(net[2], LeanSoftplus) and isinstance(net[2], nn.Softplus)
    assert isinstance(net[3], LeanMaxPool2d) and net[7].padding == 1
    assert list(net.state_dict()) == keys
    assert use_lean_layers(net) == 0  # already converted


@pytest.mark.parametrize("name", ["r2et", "r2et_noh", "est_h", "grad_norm"])
def test_double_backprop_matches_pytorch_in_float64(name):
    ref, lean = make_net(), make_net()
    use_lean_layers(lean)
    x, y = batch()
    objective = build_objective(name, k=8)
    out_ref, out_lean = objective(ref, x, y), objective(lean, x, y)
    torch.testing.assert_close(out_lean.loss, out_ref.loss, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(out_ref.loss, list(ref.parameters()))
    g_lean = torch.autograd.grad(out_lean.loss, list(lean.parameters()))
    for a, b in zip(g_lean, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)  # conv biases before BN: ~0


def test_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(2)
    z = (4 * torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)).requires_grad_(True)
    softplus = lambda t: _Softplus.apply(t, 2.0, 3.0)  # noqa: E731  (|beta z| > threshold happens)
    pool = lambda t: _MaxPool.apply(t, 3, 2, 1, 1, True)  # noqa: E731  (overlapping windows, ceil mode)
    for fn in (softplus, pool):
        assert gradcheck(fn, (z,)) and gradgradcheck(fn, (z,))


def _saved_bytes(loss: torch.Tensor) -> int:
    """Bytes of the distinct storages the autograd graph of ``loss`` holds for its backward."""
    storages: dict[int, int] = {}
    stack, seen = [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        tensors = [getattr(fn, a, None) for a in dir(fn) if a.startswith("_saved_")]
        try:
            tensors += list(getattr(fn, "saved_tensors", ()))
        except RuntimeError:
            pass
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.numel() > 1:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return sum(storages.values())


def test_r2et_graph_holds_less_memory():
    """Per Softplus one activation (the incoming gradient) and per max pooling its input are no
    longer saved: on this net the R2ET graph shrinks by at least 20% (measured: ~27%)."""
    x, y = batch(torch.float32)
    objective = build_objective("r2et", k=8)
    sizes = []
    for lean in (False, True):
        net = make_net(torch.float32)
        use_fast_batchnorm(net)
        if lean:
            use_lean_layers(net)
        sizes.append(_saved_bytes(objective(net, x, y).loss))
    assert sizes[1] < 0.8 * sizes[0], sizes


def test_first_order_and_no_grad_paths_unchanged():
    ref, lean = make_net(), make_net()
    use_lean_layers(lean)
    x, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(lean(x), ref(x), rtol=0, atol=0)
    loss_ref = nn.functional.cross_entropy(ref(x), y)
    loss_lean = nn.functional.cross_entropy(lean(x), y)
    for a, b in zip(torch.autograd.grad(loss_lean, list(lean.parameters())), torch.autograd.grad(loss_ref, list(ref.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_third_derivative_is_refused_clearly():
    net = make_net()
    use_lean_layers(net)
    x = batch()[0].requires_grad_(True)
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    torch.autograd.grad(g.pow(2).sum(), x, retain_graph=True)  # second order: fine
    with pytest.raises(RuntimeError, match="lean_layers: false"):  # a graph for a third: refused
        torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("conv_kwargs", [
    dict(padding=1), dict(stride=2, padding=1, bias=False), dict(groups=2, dilation=2, padding=2),
])
def test_lean_convolution_matches_pytorch_to_second_order(conv_kwargs):
    torch.manual_seed(3)
    ref = nn.Conv2d(4, 6, 3, **conv_kwargs).double()
    lean = nn.Conv2d(4, 6, 3, **conv_kwargs).double()
    lean.load_state_dict(ref.state_dict())
    use_lean_layers(lean)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(ref(x))

    def second_order(conv):
        # the R2ET pattern: an input gradient with a graph, a loss on it, one backward to everything
        (g,) = torch.autograd.grad((conv(x) * v).sum(), x, create_graph=True)
        return torch.autograd.grad((g.sin() * x).sum() + conv(x).pow(2).mean(), [x, *conv.parameters()])

    for a, b in zip(second_order(lean), second_order(ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    args = (tuple(lean.stride), tuple(lean.padding), tuple(lean.dilation), lean.groups)
    w = lean.weight.detach().clone().requires_grad_(True)
    fn = lambda t, w: _Conv.apply(t, w, None, args)  # noqa: E731
    assert gradcheck(fn, (x, w)) and gradgradcheck(fn, (x, w))


def test_lean_convolution_falls_back_under_autocast_and_no_grad():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    use_lean_layers(conv)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and "_Conv" not in type(out.grad_fn).__name__
    with torch.no_grad():
        assert conv(x).grad_fn is None
    assert "_Conv" in type(conv(x).grad_fn).__name__
