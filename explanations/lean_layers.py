"""Softplus, max pooling and convolution whose double-backprop graph is cheaper.

A double-backprop objective keeps the graph of an input gradient g(x) alive until its final
``backward``; each layer's first backward saves what its own backward (the double backward) needs.
PyTorch's versions save more than that:

- Softplus, s = softplus(z) with gz = gs * sig(beta z): the double backward needs
  d/dgs = v sig(beta z) and d/dz = v gs beta sig (1 - sig). PyTorch saves z and the incoming
  gradient gs. Since gs sig = gz, d/dz = v gz beta (1 - sig): saving the *outgoing* gradient gz
  instead is exact, and gz is already saved by the layer below (BatchNorm's double backward
  keeps it), so one full-size activation per Softplus is no longer held.
- Max pooling: PyTorch's backward keeps the pooled *input* (only its shape is used) next to the
  indices. Here the backward is a scatter-add of the output gradient at the indices, which saves
  the indices only (one input-sized activation per pooling layer less).

Values and gradients (first and second order) are those of ``nn.Softplus`` / ``nn.MaxPool2d``
(``tests/explanations/test_lean_layers.py`` checks both in float64). A third derivative is
refused with a clear error. :func:`use_lean_layers` converts a model in place (same modules,
no parameters involved); RobustClassifier does it for double-backprop objectives
(``lean_layers: true``, the default). Measured effect: docs/benchmarks.md.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_THIRD_ORDER = (
    "{name} supports up to second derivatives (double backprop); for a third derivative build "
    "the model with lean_layers: false"
)


class _SoftplusGrad(torch.autograd.Function):
    """forward: gz = softplus_backward(gs, z); backward: the double backward from (z, gz)."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, z: Tensor, beta: float, threshold: float) -> Tensor:
        grad_in = torch.ops.aten.softplus_backward(grad_out, z, beta, threshold)
        ctx.save_for_backward(z, grad_in)
        ctx.beta, ctx.threshold = beta, threshold
        return grad_in

    @staticmethod
    def backward(ctx, v: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(_THIRD_ORDER.format(name="LeanSoftplus"))
        z, grad_in = ctx.saved_tensors
        need_gy, need_z = ctx.needs_input_grad[:2]
        # sig = sigmoid(beta z), set to 1 where softplus is linear (beta z > threshold): PyTorch's
        # own fused kernel with a unit incoming gradient gives exactly that in one pass
        sig = torch.ops.aten.softplus_backward(torch.ones((), dtype=z.dtype, device=z.device).expand_as(z), z, ctx.beta, ctx.threshold)
        d_gy = v * sig if need_gy else None
        d_z = None
        if need_z:  # beta v gz (1 - sig): 0 where linear
            q = v * grad_in
            d_z = torch.addcmul(q, q, sig, value=-1.0).mul_(ctx.beta)
        return d_gy, d_z, None, None


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, beta: float, threshold: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.beta, ctx.threshold = beta, threshold
        return F.softplus(z, beta, threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (z,) = ctx.saved_tensors
        return _SoftplusGrad.apply(grad_out, z, ctx.beta, ctx.threshold), None, None


class LeanSoftplus(nn.Softplus):
    """``nn.Softplus`` whose double backward saves the outgoing gradient (see the module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _Softplus.apply(x, float(self.beta), float(self.threshold))


class _MaxPoolGrad(torch.autograd.Function):
    """forward: scatter-add of the output gradient at the argmax indices; linear in it."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, indices: Tensor, shape: torch.Size) -> Tensor:
        ctx.save_for_backward(indices)
        b, c = shape[:2]
        flat_idx = indices.reshape(b, c, -1)
        grad_in = grad_out.new_zeros(b, c, shape[2] * shape[3])
        return grad_in.scatter_add_(2, flat_idx, grad_out.reshape(b, c, -1)).view(shape)

    @staticmethod
    def backward(ctx, v: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(_THIRD_ORDER.format(name="LeanMaxPool2d"))
        (indices,) = ctx.saved_tensors
        b, c = indices.shape[:2]
        d_gy = v.reshape(b, c, -1).gather(2, indices.reshape(b, c, -1)).view(indices.shape)
        return d_gy, None, None


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor:
        out, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.save_for_backward(indices)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (indices,) = ctx.saved_tensors
        return _MaxPoolGrad.apply(grad_out, indices, ctx.shape), None, None, None, None, None


class LeanMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (4-D input) whose backward keeps only the argmax indices."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or x.dim() != 4 or not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        return _MaxPool.apply(x, self.kernel_size, stride, self.padding, self.dilation, self.ceil_mode)


def _conv_backward(grad_out: Tensor, inp: Tensor, weight: Tensor, args: tuple, mask: list[bool], bias: bool = False):
    """aten.convolution_backward for y = conv2d(inp, weight): (d inp, d weight, d bias) per ``mask``."""
    stride, padding, dilation, groups = args
    return torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]] if bias else None, stride, padding, dilation,
        False, [0, 0], groups, mask,
    )


def _used(param: Tensor) -> bool:
    """Whether the running backward pass will deliver a gradient to ``param``.

    The node is the parameter's gradient edge (its AccumulateGrad for a leaf), found whatever the
    grad mode (the double backward of an attack runs with grad mode off). ``autograd.grad(...,
    inputs=x)`` executes only the nodes on the way to ``x``: False for the weights then.
    """
    if not param.requires_grad:
        return False
    node = torch.autograd.graph.get_gradient_edge(param).node
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # autograd.grad(..., inputs=[param]): a captured leaf, so it is wanted
        return True


class _ConvInputGrad(torch.autograd.Function):
    """forward: gx = d conv2d(x, W) / dx applied to gy (a transposed convolution), linear in gy
    and in W; backward: d/dgy = conv2d(v, W), d/dW = the weight gradient of conv2d(v, .) at gy,
    each one native kernel (PyTorch's double backward builds the weight term from a convolution
    over transposed, copied tensors)."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, weight: Tensor, inp: Tensor, args: tuple) -> Tensor:
        ctx.save_for_backward(grad_out, weight)
        ctx.args = args
        return _conv_backward(grad_out, inp, weight, args, [True, False, False])[0]

    @staticmethod
    def backward(ctx, v: Tensor):
        grad_out, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        need_gy, need_w = ctx.needs_input_grad[:2]
        d_gy = F.conv2d(v, weight, None, stride, padding, dilation, groups) if need_gy else None
        # an attack differentiates through the input gradient w.r.t. the input only: no d/dW then
        d_w = _conv_backward(grad_out, v, weight, ctx.args, [False, True, False])[1] if need_w and _used(weight) else None
        return d_gy, d_w, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, args: tuple) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.bias = args, bias  # a parameter (or None): no copy, no cycle
        return F.conv2d(x, weight, bias, *args)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        has_bias = ctx.bias is not None
        need_b = need_b and has_bias
        if not torch.is_grad_enabled():  # plain backward: one fused kernel call
            # (in an attack's double backward only the input gradient is wanted: no d/dW, d/db)
            need_w = need_w and _used(weight)
            need_b = need_b and _used(ctx.bias)
            gx, gw, gb = _conv_backward(grad_out, x, weight, ctx.args, [need_x, need_w, need_b], has_bias)
            return gx, gw, gb, None
        # create_graph: each gradient is differentiable (the input one through _ConvInputGrad).
        # An input gradient autograd.grad(..., inputs=x) does not need the parameters' gradients:
        # skip them when the engine will not use them (needs_input_grad only says they could be).
        gx = _ConvInputGrad.apply(grad_out, weight, x, ctx.args) if need_x else None
        gw = _conv_backward(grad_out, x, weight, ctx.args, [False, True, False])[1] if need_w and _used(weight) else None
        gb = grad_out.sum((0, 2, 3)) if need_b and _used(ctx.bias) else None
        return gx, gw, gb, None


class LeanConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input gradient has a two-kernel double backward (see ``_ConvInputGrad``).

    Falls back to ``nn.Conv2d`` for string padding, a non-zero padding mode, autocast and no-grad
    calls.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            isinstance(self.padding, str) or self.padding_mode != "zeros" or x.dim() != 4
            or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)
            or not (x.requires_grad or self.weight.requires_grad)
        ):
            return super().forward(x)
        args = (tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
        return _Conv.apply(x, self.weight, self.bias, args)


def missing_private_ops() -> list[str]:
    """The private PyTorch entry points the lean layers call that this torch lacks."""
    missing = []
    if not hasattr(torch._C, "_will_engine_execute_node"):
        missing.append("torch._C._will_engine_execute_node")
    if not hasattr(getattr(torch.autograd, "graph", None), "get_gradient_edge"):
        missing.append("torch.autograd.graph.get_gradient_edge")
    for op in ("convolution_backward", "softplus_backward"):
        if not hasattr(torch.ops.aten, op):
            missing.append(f"aten.{op}")
    return missing


#: None when every private op exists; else the reason the lean layers are off (checked at import).
UNAVAILABLE: str | None = None
if missing_private_ops():
    UNAVAILABLE = (
        f"torch {torch.__version__} lacks {', '.join(missing_private_ops())}: the lean layers are off "
        "and PyTorch's own Softplus / MaxPool2d / Conv2d are used (same results, more memory and time)"
    )
_warned = False


def use_lean_layers(model: nn.Module) -> int:
    """Turn every exact ``nn.Softplus`` / ``nn.MaxPool2d`` / ``nn.Conv2d`` of ``model`` into its
    lean version in place.

    Returns how many modules were converted (subclasses are left alone: their forward may differ);
    0, with one warning per process, when this torch lacks a private op they need
    (:func:`missing_private_ops`).
    """
    global _warned
    if UNAVAILABLE is not None:
        if not _warned:
            warnings.warn(f"lean_layers: {UNAVAILABLE}", UserWarning, stacklevel=2)
            _warned = True
        return 0
    lean = {nn.Softplus: LeanSoftplus, nn.MaxPool2d: LeanMaxPool2d, nn.Conv2d: LeanConv2d}
    count = 0
    for module in model.modules():
        if type(module) in lean:
            module.__class__ = lean[type(module)]
            count += 1
    return count
