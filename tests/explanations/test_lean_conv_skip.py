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


def test_missing_private_op_falls_back_with_one_warning(monkeypatch):
    import warnings

    import explanations.lean_layers as lean

    monkeypatch.delattr(torch._C, "_will_engine_execute_node")
    assert lean.missing_private_ops() == ["torch._C._will_engine_execute_node"]
    monkeypatch.setattr(lean, "UNAVAILABLE", "torch x lacks torch._C._will_engine_execute_node: ...")
    monkeypatch.setattr(lean, "_warned", False)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lean.use_lean_layers(net) == 0
        assert lean.use_lean_layers(net) == 0
    assert [str(w.message) for w in caught] == ["lean_layers: torch x lacks torch._C._will_engine_execute_node: ..."]
    assert type(net[0]) is nn.Conv2d


def test_classifier_turns_tf32_off_for_evaluation():
    import lightning as L

    from lightning_modules.classifier import RobustClassifier

    seen = []

    class Probe(L.Callback):
        def on_validation_batch_start(self, *args, **kwargs):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(2, 3, 8, 8), torch.tensor([0, 1])), batch_size=2)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        for allow, expected in ((False, (False, False)), (True, (True, True))):
            module = RobustClassifier(backbone="resnet9", backbone_kwargs={"width": 2}, num_classes=3,
                                      objective="vanilla", allow_tf32=allow)
            trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                callbacks=[Probe()], inference_mode=False, enable_model_summary=False)
            trainer.validate(module, data, verbose=False)
            assert seen[-1] == expected
            assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
