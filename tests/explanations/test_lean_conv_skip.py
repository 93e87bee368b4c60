"""The lean convolution skips d/dW when a gradient is taken w.r.t. the input only (attacks)."""

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from explanations.lean_layers import use_lean_layers


class CountWeightGrads(TorchDispatchMode):
    """Counts aten.convolution_backward calls that compute the weight gradient (output_mask[1])."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_grads = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls += 1
            self.weight_grads += bool(args[-1][1])
        return func(*args, **(kwargs or {}))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=2.0), nn.Conv2d(4, 4, 3, padding=1, bias=True),
        nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    )
    assert use_lean_layers(net) == 4
    return net


def _saliency_loss(net, x, y):
    loss = nn.functional.cross_entropy(net(x), y)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    return g.abs().sum()


def test_attack_step_computes_no_weight_gradient():
    net, x, y = _net(), torch.rand(2, 3, 8, 8, requires_grad=True), torch.tensor([0, 2])
    with CountWeightGrads() as counter:
        (gx,) = torch.autograd.grad(_saliency_loss(net, x, y), x)
    assert counter.calls > 0 and counter.weight_grads == 0, (counter.calls, counter.weight_grads)
    assert gx.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    # reference: the same input gradient without the lean layers
    ref = _net()
    for m in ref.modules():
        if type(m).__name__.startswith("Lean"):
            m.__class__ = m.__class__.__mro__[1]
    (gx_ref,) = torch.autograd.grad(_saliency_loss(ref, x, y), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-7)


def test_training_backward_still_computes_weight_gradients():
    net, x, y = _net(), torch.rand(2, 3, 8, 8, requires_grad=True), torch.tensor([0, 2])
    with CountWeightGrads() as counter:
        _saliency_loss(net, x, y).backward()
    assert counter.weight_grads >= 2  # each conv's d/dW of the double backward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
