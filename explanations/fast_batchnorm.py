"""Training-mode BatchNorm with a cheap double backward (for double-backprop objectives).

The regularizers differentiate an input gradient, so the final ``backward`` runs the *double*
backward of every layer. PyTorch's double backward of ``native_batch_norm_backward`` is a generic
composite of about 185 ATen calls per layer (dozens of full-size multiplications and reductions);
on CPU it was the largest single cost of an R2ET step, ahead of the convolutions
(docs/benchmarks.md). This module keeps PyTorch's fused kernels for the forward and the first
backward and supplies a closed-form double backward of about a dozen full-size passes.

Per channel, with N = B * H * W values, mu and 1/sigma = r the batch statistics,
x_hat = (x - mu) r, the first backward is ``gx = gamma r P(gy)`` with the projection
``P(z) = z - mean(z) - x_hat mean(z x_hat)``. For an incoming gradient v of gx (and gg_gamma,
gg_beta of the weight gradients, when those were part of the graph):

    d/dgy    = gamma r P(v) + gg_beta + gg_gamma x_hat
    d/dgamma = r sum(v P(gy))
    d/dx     = -gamma r^2 [ (mean(v gy) - mean(v) mean(gy) - 3 mean(v x_hat) mean(gy x_hat)) x_hat
                            + mean(gy x_hat) (v - mean(v)) + mean(v x_hat) (gy - mean(gy)) ]
               + gg_gamma r P(gy)

(the derivation is in docs/benchmarks.md; ``tests/explanations/test_fast_batchnorm.py`` checks it
against PyTorch's own double backward in float64). Eval mode (running statistics: an affine map
whose double backward is already cheap) runs PyTorch's module unchanged; a third derivative is
refused with a clear error.

Use :func:`use_fast_batchnorm` on a model (in place: the modules keep their parameters, buffers,
state-dict keys and ``isinstance(m, nn.BatchNorm2d)``); RobustClassifier does it for
double-backprop objectives (``fast_batchnorm: true``, the default).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_REDUCE = (0, 2, 3)


def _channel(t: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1)."""
    return t.view(1, -1, 1, 1)


def _mean(t: Tensor) -> Tensor:
    return t.mean(_REDUCE, keepdim=True)


def _dot_mean(p: Tensor, q: Tensor) -> Tensor:
    """Per-channel mean of p * q, (1, C, 1, 1), in the promoted dtype."""
    return _mean(torch.mul(p, q)).to(torch.promote_types(p.dtype, q.dtype))


def _like(t: Tensor | None, ref: Tensor) -> Tensor | None:
    return None if t is None else t.to(ref.dtype)


class _BatchNormBackward(torch.autograd.Function):
    """forward: PyTorch's fused first backward; backward: the closed-form double backward."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, x: Tensor, weight: Tensor, save_mean: Tensor, save_invstd: Tensor, eps: float):
        # the parameters' own flags: in a backward without create_graph ctx.needs_input_grad is
        # not the question (are the weight gradients wanted?)
        mask = [True, bool(weight.requires_grad), bool(weight.requires_grad)]
        grad_in, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, None, None, save_mean, save_invstd, True, eps, mask
        )
        ctx.save_for_backward(grad_out, x, weight, save_mean, save_invstd)
        ctx.set_materialize_grads(False)  # unused outputs (the weight gradients) come back as None
        return grad_in, grad_weight, grad_bias

    @staticmethod
    def backward(ctx, gg_in: Tensor | None, gg_weight: Tensor | None, gg_bias: Tensor | None):
        if torch.is_grad_enabled():  # create_graph=True: a third derivative was asked for
            raise RuntimeError(
                "FastBatchNorm2d supports up to second derivatives (double backprop); for a third "
                "derivative build the model with fast_batchnorm: false"
            )
        grad_out, x, weight, save_mean, save_invstd = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        dtype = torch.promote_types(x.dtype, save_invstd.dtype)
        r = _channel(save_invstd).to(dtype)
        gamma_r = _channel(weight).to(dtype) * r
        # x_hat = x r - mu r in one pass
        x_hat = torch.addcmul(-_channel(save_mean).to(dtype) * r, x, r)
        a = _mean(grad_out).to(dtype)             # mean(gy)
        b = _dot_mean(grad_out, x_hat)            # mean(gy x_hat)
        d_gy = d_x = d_w = None
        if gg_in is not None:
            v = gg_in
            v_mean = _mean(v).to(dtype)
            v_xhat = _dot_mean(v, x_hat)          # mean(v x_hat)
            if need_gy:  # gamma r (v - mean(v) - x_hat mean(v x_hat)): two passes
                d_gy = torch.addcmul(-gamma_r * v_mean, v, gamma_r).addcmul_(x_hat, -gamma_r * v_xhat)
            if need_x or need_w:
                v_gy = _dot_mean(v, grad_out)     # mean(v gy)
            if need_x:
                # -gamma r^2 [c x_hat + b (v - mean v) + m (gy - a)], c = mean(v gy) - mean(v) a - 3 m b
                k = -gamma_r * r
                c = v_gy - v_mean * a - 3.0 * v_xhat * b
                d_x = torch.addcmul(-k * (b * v_mean + v_xhat * a), x_hat, k * c)
                d_x.addcmul_(v, k * b).addcmul_(grad_out, k * v_xhat)
            if need_w:  # r sum(v P(gy)) = r N (mean(v gy) - mean(v) a - mean(v x_hat) b)
                n = x.numel() // x.shape[1]
                d_w = (r * n * (v_gy - v_mean * a - v_xhat * b)).flatten()
        if gg_weight is not None or gg_bias is not None:  # the weight gradients were differentiated too
            extra_gy = torch.zeros_like(x_hat)
            if gg_bias is not None:
                extra_gy += _channel(gg_bias).to(dtype)
            if gg_weight is not None:
                gg_w = _channel(gg_weight).to(dtype)
                extra_gy.addcmul_(x_hat, gg_w)
                if need_x:  # d/dx of sum(gy x_hat): r P(gy)
                    extra_x = torch.addcmul(gg_w * r * (grad_out.to(dtype) - a), x_hat, -gg_w * r * b)
                    d_x = extra_x if d_x is None else d_x + extra_x
            if need_gy:
                d_gy = extra_gy if d_gy is None else d_gy + extra_gy
        return _like(d_gy, grad_out), _like(d_x, x), _like(d_w, weight), None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm (batch statistics, running statistics updated in place)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        out, save_mean, save_invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        grad_in, grad_weight, grad_bias = _BatchNormBackward.apply(grad_out, x, weight, save_mean, save_invstd, ctx.eps)
        return grad_in, grad_weight, grad_bias, None, None, None, None


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode double backward is the closed form above.

    Same parameters, buffers and state dict; eval mode and every other case (no affine weights,
    no 4-D input) run ``nn.BatchNorm2d.forward`` unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or not self.affine or x.dim() != 4 or not torch.is_grad_enabled():
            return super().forward(x)
        self._check_input_dim(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            running_mean, running_var = self.running_mean, self.running_var
        else:
            momentum, running_mean, running_var = 0.0, None, None
        return _BatchNormTrain.apply(x, self.weight, self.bias, running_mean, running_var, momentum, self.eps)


def use_fast_batchnorm(model: nn.Module) -> int:
    """Turn every exact ``nn.BatchNorm2d`` of ``model`` into :class:`FastBatchNorm2d` in place.

    Returns how many modules were converted. Subclasses of BatchNorm2d (SyncBatchNorm is not a
    subclass; timm's BatchNormAct2d is) are left alone: their forward may differ.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FastBatchNorm2d
            count += 1
    return count
