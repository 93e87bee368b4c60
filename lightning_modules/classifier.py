"""RobustClassifier: a timm backbone trained with CE plus an explanation-robustness regularizer.

The objective (DESIGN §4) is chosen by name; the math lives in ``explanations.objectives`` and this
module only wires it into Lightning: metrics, logging, optimizers, fine-tuning from checkpoints,
and the guards that double backprop needs (no torch.compile, no SyncBatchNorm).
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from explanations.fast_batchnorm import use_fast_batchnorm
from explanations.lean_layers import use_lean_layers
from explanations.objectives import AUTOCAST_MIN_H, OBJECTIVES, SHARED_SETTINGS, build_objective, objective_entry
from explanations.precision import set_tf32, tf32_flags
from explanations.saliency import num_features
from explanations.validation import check_k, check_pool
from lightning_modules.backbones import build_backbone, check_pending_output
from lightning_modules.checkpoints import (
    architecture_differences,
    format_differences,
    load_model_weights,
    missing_hparams,
    state_dict_differences,
)
from lightning_modules.reliability import batchnorm_state, restore_state

log = logging.getLogger(__name__)

# Under DDP the train/* terms are averaged over ranks in training_step (one all-reduce for all of
# them), so Lightning's advice to log them with sync_dist=True (one collective per key) is moot.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('train/", category=PossibleUserWarning)


def default_optimizer(params) -> torch.optim.Optimizer:
    """Adam, lr 1e-3: a safe default; configs usually give SGD with momentum and weight decay."""
    return torch.optim.Adam(params, lr=1e-3)


class NonFiniteLossError(FloatingPointError):
    """The training loss (or one of its terms) is NaN or infinite."""


class RobustClassifier(L.LightningModule):
    """Image classifier (pixel space, [0, 1] inputs) trained with a selectable objective.

    Args:
        backbone: a timm model name (``resnet9``, ``resnet20``, any timm name) or an ``nn.Module``
            mapping normalised images (B, C, H, W) to logits (B, num_classes): an instance from
            Python, or ``class_path``/``init_args`` in YAML (README "Backbones").
        num_classes, in_chans: classifier outputs and input channels.
        pretrained: timm hub weights; ``weights_file``: a local state dict instead.
        activation, softplus_beta: ``softplus`` swaps ReLU-type activations (SP baseline).
        cifar_stem: 3x3 stride-1 stem, no max-pool, for 32 px inputs (ResNet family).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
        output_key: for a backbone whose forward returns a tuple (``0``: its first element), a
            dict or an object with attributes (``logits``, as Hugging Face models return): where
            the logits are. Checked at build by one forward of a one-image example input, which
            refuses any output that is not logits (B, num_classes), naming what it returned.
        objective: one of ``OBJECTIVES`` (vanilla, r2et, r2et_noh, r2et_mm, r2et_mm_noh, est_h,
            grad_norm, at, ...).
        k, pair_set, minmax_m, h, adaptive, weight, weight_gap, weight_curvature, target, pool:
            the regularizer's settings (see ``explanations.objectives``).
        objective_kwargs: further objective-specific settings (e.g. the AT attack's eps/steps).
        optimizer, lr_scheduler: callables that build them from parameters (LightningCLI style).
        init_from: a checkpoint of this project to start from (pretrain-then-fine-tune); the
            classifier is re-initialised when its shape differs.
        nonfinite: ``error`` stops training on a NaN/inf loss naming the term and batch;
            ``skip`` skips such batches and counts them (single-process only).
        compile: wrap the backbone in ``torch.compile`` (refused with double-backprop objectives).
        fast_batchnorm: for double-backprop objectives, give every ``nn.BatchNorm2d`` the
            closed-form double backward of ``explanations.fast_batchnorm`` (same parameters,
            state dict and results; about 25% less time per R2ET step on CPU).
        lean_layers: for double-backprop objectives, use ``explanations.lean_layers``' Softplus
            and max pooling, whose double-backprop graph holds one activation less per layer
            (same results; about 20% less R2ET step memory), and its convolution, whose double
            backward uses native kernels (same results; ~8% less time per R2ET step on CPU).
        allow_tf32: False (default): fit, validate, test and predict run with TF32 convolutions
            and matmuls off on GPU (``explanations.precision.full_fp32``), flags restored after.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet9",
        num_classes: int = 10,
        in_chans: int = 3,
        pretrained: bool = False,
        weights_file: str | None = None,
        activation: Literal["relu", "softplus"] = "relu",
        softplus_beta: float = 2.0,
        cifar_stem: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        output_key: int | str | None = None,
        objective: str = "r2et",
        k: int | float = 0.1,
        pair_set: Literal["boundary", "all", "minmax"] = "boundary",
        minmax_m: int | None = None,
        h: float = 1e-3,
        adaptive: bool = True,
        weight: float = 1.0,
        weight_gap: float | None = None,
        weight_curvature: float | None = None,
        target: Literal["loss", "logit"] = "loss",
        pool: int | None = None,
        objective_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        nonfinite: Literal["error", "skip"] = "error",
        compile: bool = False,
        fast_batchnorm: bool = True,
        lean_layers: bool = True,
        allow_tf32: bool = False,
    ) -> None:
        super().__init__()
        module_backbone = isinstance(backbone, nn.Module)  # recorded by its config, not pickled
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"] + ["backbone"] * module_backbone)
        backbone = _module_backbone_hparam(self, backbone)
        check_objective_settings(objective, k, pool, objective_kwargs)
        if nonfinite not in ("error", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r} is not valid; use 'error' or 'skip'")
        self.objective = build_objective(
            objective,
            k=k, pair_set=pair_set, minmax_m=minmax_m, h=h, adaptive=adaptive, weight=weight,
            weight_gap=weight_gap, weight_curvature=weight_curvature, target=target, pool=pool,
            **(objective_kwargs or {}),
        )
        if compile and self.objective.double_backprop:
            raise ValueError(
                f"compile=True cannot be used with objective={objective!r}: torch.compile does not "
                "support the double backward it needs; set compile: false or objective: vanilla"
            )
        self.model = build_backbone(
            backbone, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
            weights_file=weights_file, activation=activation, softplus_beta=softplus_beta,
            cifar_stem=cifar_stem, output_key=output_key, **(backbone_kwargs or {}),
        )
        if init_from is not None:
            load_model_weights(self.model, init_from, expected_hparams=self.hparams)
        self.objective.check_model(self.model)
        if fast_batchnorm and self.objective.double_backprop:
            use_fast_batchnorm(self.model)
        if lean_layers and self.objective.double_backprop:
            use_lean_layers(self.model)
        if compile:
            self.model = torch.compile(self.model)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.skipped_batches = 0

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) for images (B, C, H, W) in [0, 1]."""
        return self.model(x)

    # ---------------------------------------------------------------- precision
    def _enter_fp32(self) -> None:
        if not self.hparams.get("allow_tf32", False):
            self._tf32_stack = getattr(self, "_tf32_stack", [])
            self._tf32_stack.append(tf32_flags())
            set_tf32((False, False))

    def _exit_fp32(self) -> None:
        stack = getattr(self, "_tf32_stack", None)
        if stack:
            set_tf32(stack.pop())

    def on_validation_start(self) -> None:
        self._enter_fp32()

    def on_validation_end(self) -> None:
        self._exit_fp32()

    def on_test_start(self) -> None:
        self._enter_fp32()

    def on_test_end(self) -> None:
        self._exit_fp32()

    def on_predict_start(self) -> None:
        self._enter_fp32()

    def on_predict_end(self) -> None:
        self._exit_fp32()

    # ---------------------------------------------------------------- guards
    def on_fit_start(self) -> None:
        self._enter_fp32()
        if not self.objective.double_backprop:
            return
        if self._trainer is not None:
            check_precision(self.hparams.objective, self.trainer.precision)
        check_sync_batchnorm(self.hparams.objective, any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()))
        if getattr(self, "_compiler_ctx", None) is not None:
            raise RuntimeError(
                f"objective={self.hparams.objective!r} needs double backward, which torch.compile "
                "does not support; fit the module without torch.compile"
            )
        if self._trainer is not None:
            self._saved_tf32 = guard_curvature_precision(
                self.objective, self.device.type, str(self.trainer.precision)
            )

    def on_fit_end(self) -> None:
        saved = getattr(self, "_saved_tf32", None)
        if saved is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
            self._saved_tf32 = None
        self._exit_fp32()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the W&B run id, so that ``fit --ckpt_path`` continues the same W&B run."""
        for logger in self.loggers if self._trainer is not None else []:
            run_id = getattr(logger, "run_id", None)
            if run_id:
                checkpoint["wandb_run_id"] = str(run_id)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse (``--ckpt_path``) a checkpoint of another architecture, listing what differs.

        Runs before Lightning loads the state dict, whose own error would only print tensor names.
        """
        problems = self.checkpoint_problems(checkpoint)
        if problems:
            raise ValueError(problems)

    def checkpoint_problems(self, checkpoint: dict[str, Any]) -> str | None:
        """Why ``checkpoint`` (its ``hyper_parameters`` and ``state_dict``; tensors may be on the
        meta device, only shapes are read) does not fit this model, or None when it fits.

        Names the architecture hyper-parameters that differ, those the checkpoint does not
        record (the model was built with this run's values for them), then the state-dict keys.
        """
        saved = checkpoint.get("hyper_parameters") or {}
        arch = architecture_differences(saved, _same_module_backbone(saved, self.hparams))
        state = checkpoint.get("state_dict")
        strict = isinstance(state, dict) and self.strict_loading
        keys = state_dict_differences(state, self.state_dict()) if strict else {}
        if not (arch or any(keys.values())):
            return None
        return (
            "the checkpoint does not fit this model (it was trained with another configuration): "
            + format_differences(arch, keys, missing=missing_hparams(saved, self.hparams))
            + ". Resume with the configuration the checkpoint was trained with, or use "
            "model.init_from to fine-tune from it."
        )

    def check_data(self, datamodule: Any) -> None:
        """:func:`check_against_data`, and the backbone output check on an input of the data's
        image size when the one-image example of the build did not fit the backbone."""
        check_against_data(self.hparams, datamodule)
        check_pending_output(self.model, getattr(datamodule, "image_size", None))

    # ---------------------------------------------------------------- DDP
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _mean_over_ranks(self, values: Tensor) -> Tensor:
        """All-reduce mean of a small tensor over the data-parallel ranks (one collective)."""
        return self.trainer.strategy.reduce(values, reduce_op="mean")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.check_data(datamodule)
        # Under DDP each rank sees batch_size samples; the adaptive weights use the statistics of
        # the global batch (one 3-float all-reduce per step), so a run on N ranks computes the same
        # loss as one process on the N-times larger batch.
        if hasattr(self.objective, "reduce_stats"):
            self.objective.reduce_stats = self._mean_over_ranks if self._distributed() else None

    # ---------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int):
        x, y = batch[0], batch[1]
        if x.shape[0] == 0:  # every image of the batch was undecodable and skipped (bad_images: skip)
            return None
        running_stats = batchnorm_state(self.model)
        out = self.objective(self.model, x, y)
        if not torch.isfinite(out.loss):
            restore_state(running_stats)  # the forward already moved BatchNorm statistics towards NaN
            bad = sorted(name for name, v in out.terms.items() if not torch.isfinite(v).all()) or ["loss"]
            message = (
                f"non-finite training loss at epoch {self.current_epoch}, batch {batch_idx}: "
                f"term(s) {bad} are NaN/inf (terms: { {n: float(v) for n, v in out.terms.items()} })"
            )
            if self.hparams.nonfinite == "error":
                raise NonFiniteLossError(message + "; set model.nonfinite: skip to skip such batches")
            self.skipped_batches += 1
            log.warning("%s; skipped (%d so far)", message, self.skipped_batches)
            self.log("train/skipped_batches", float(self.skipped_batches), on_step=True, on_epoch=False)
            return None
        self.train_acc(out.logits.detach(), y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        terms = out.terms
        if self._distributed() and terms:  # log global-batch values: one all-reduce for all terms
            names = list(terms)
            reduced = self._mean_over_ranks(torch.stack([terms[n].detach().float() for n in names]))
            terms = dict(zip(names, reduced.unbind()))
        terms = with_regularizer_contribution(terms)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, prog_bar=name == "loss")
        return out.loss

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch[0], batch[1]
        if x.shape[0] == 0:
            return
        fitting = self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if fitting and self.objective.double_backprop and not torch.is_inference_mode_enabled():
            # the regularizer's terms on validation data; a standalone validate/test evaluates the
            # model, not its training objective: CE and accuracy only
            with torch.enable_grad():
                out = self.objective(self.model, x, y)
            logits, terms = out.logits.detach(), out.terms
        else:
            logits = self.model(x)
            terms = {"ce": nn.functional.cross_entropy(logits, y)}
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in with_regularizer_contribution(terms).items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        return self.model(batch[0] if isinstance(batch, (tuple, list)) else batch)

    # ---------------------------------------------------------------- optim
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


FP16_PRECISIONS = ("16", "16-mixed", "16-true")

def check_objective_settings(
    objective: str, k: object, pool: int | None, objective_kwargs: dict[str, Any] | None
) -> None:
    """Refuse an unknown objective, an invalid ``k``/``pool`` and ``objective_kwargs`` keys that
    are not options of the objective's registry entry (``OBJECTIVES[objective].options``).

    The error names the value and lists the valid ones (the objective factories would otherwise
    ignore unknown keys, e.g. a typo ``stepz: 3``).
    """
    entry = objective_entry(objective)
    check_k(k)
    check_pool(pool)
    if objective_kwargs is not None and not isinstance(objective_kwargs, dict):
        raise ValueError(f"objective_kwargs={objective_kwargs!r} must be a mapping of option names to values")
    valid = entry.options
    unknown = sorted(set(objective_kwargs or {}) - set(valid))
    if unknown:
        shared = ", ".join(SHARED_SETTINGS)
        listed = f"valid objective_kwargs for {objective!r}: {list(valid)}" if valid else f"objective {objective!r} takes no objective_kwargs"
        raise ValueError(
            f"objective_kwargs key(s) {unknown} not known for objective={objective!r}; {listed} "
            f"(the shared settings {shared} are top-level model.* arguments)"
        )
    if entry.k_option is not None and entry.k_option in (objective_kwargs or {}):
        check_k(objective_kwargs[entry.k_option], f"objective_kwargs.{entry.k_option}")


def check_against_data(hparams: Any, datamodule: Any) -> None:
    """Refuse a model whose ``num_classes``, ``in_chans``, ``k`` or ``pool`` cannot fit the data
    (``k`` where the objective's registry entry ``uses_k``, or its ``k_option`` when given).

    Uses the DataModule contract properties (``num_classes``, ``in_chans``, ``image_size``), which
    every project DataModule has before ``setup``; a DataModule without them is not checked.
    """
    problems = []
    for key in ("num_classes", "in_chans"):
        have, want = hparams.get(key), getattr(datamodule, key, None)
        if want is not None and have is not None and int(have) != int(want):
            problems.append(f"model.{key}={have} but the data ({type(datamodule).__name__}) has {key}={want}; set model.{key}: {want}")
    size = getattr(datamodule, "image_size", None)
    entry = OBJECTIVES.get(hparams.get("objective"))
    if size is not None:
        pool = hparams.get("pool")
        if pool and pool > 1 and size % pool:
            problems.append(f"model.pool={pool} does not divide the image size {size}; valid: a divisor of {size}")
        n = num_features(size, size, pool)
        ks = [("model.k", hparams.get("k"))] if entry is not None and entry.uses_k else []
        option_k = (hparams.get("objective_kwargs") or {}).get(entry.k_option) if entry and entry.k_option else None
        if option_k is not None:  # e.g. at's attack_k: the k the objective uses in place of model.k
            ks = [(f"model.objective_kwargs.{entry.k_option}", option_k)]
        for name, k in ks:
            if isinstance(k, int) and not 1 <= k <= n:
                problems.append(f"{name}={k} is out of range for {size}x{size} images (pool={pool}): "
                                f"{n} saliency features; valid: an integer in [1, {n}] or a fraction in (0, 1)")
    if problems:
        raise ValueError("the model does not fit the data: " + "; ".join(problems))


def with_regularizer_contribution(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add ``reg = loss - ce`` and ``weighted_<t> = lambda_<t> * t`` for each weighted term ``t``.

    Under adaptive weights ``loss`` can be close to ``ce`` while the terms are large (their
    weighted sum nearly cancels); these show what the regularizer adds to the loss.
    """
    if "loss" not in terms or "ce" not in terms or "ce_adv" in terms:
        return terms
    out = dict(terms)
    out["reg"] = terms["loss"] - terms["ce"]
    for name in [n[len("lambda_"):] for n in terms if n.startswith("lambda_")]:
        if name in terms:
            out[f"weighted_{name}"] = terms[f"lambda_{name}"] * terms[name]
    return out


def _module_backbone_hparam(module: L.LightningModule, backbone: Any) -> Any:
    """Keep hyper-parameters serialisable for an ``nn.Module`` backbone, and rebuild one.

    A backbone from YAML is recorded as LightningCLI parsed it (``class_path``/``init_args``); a
    Python instance as ``{"class_path": "pkg.mod.Class"}`` (its constructor arguments are
    unknown, so loading such a checkpoint needs ``backbone=`` again). A ``class_path`` mapping
    with ``init_args`` is instantiated. Returns the backbone to build.
    """
    if isinstance(backbone, nn.Module):
        given = _given_hyperparameters.get() or {}
        record = given.get("backbone")
        if not (isinstance(record, dict) and "class_path" in record):
            record = {"class_path": f"{type(backbone).__module__}.{type(backbone).__qualname__}"}
        module.hparams["backbone"] = record
        module._hparams_initial["backbone"] = copy.deepcopy(record)
        return backbone
    if not isinstance(backbone, dict):
        return backbone
    path = backbone.get("class_path")
    if not isinstance(path, str) or "init_args" not in backbone and "dict_kwargs" not in backbone:
        raise ValueError(
            f"backbone={backbone!r}: this nn.Module backbone was given as a Python instance when the "
            "checkpoint was saved, so its constructor arguments are unknown; pass backbone=<the "
            "module> again (e.g. RobustClassifier.load_from_checkpoint(path, backbone=MyNet(...)))"
        )
    module_name, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"backbone class_path={path!r} is not an nn.Module subclass")
    return cls(**(backbone.get("init_args") or {}), **(backbone.get("dict_kwargs") or {}))


def _same_module_backbone(saved: dict[str, Any], hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with the saved backbone where both are nn.Module backbones of the same class
    and one of them is known by class only (a Python instance): the weights' keys and shapes are
    compared next, and catch any other difference."""
    def config(value: Any) -> Any:
        if isinstance(value, nn.Module):
            return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}"}
        return value

    mine, theirs = config(hparams.get("backbone")), config(saved.get("backbone"))
    if (isinstance(mine, dict) and isinstance(theirs, dict) and mine.get("class_path") == theirs.get("class_path")
            and (set(mine) == {"class_path"} or set(theirs) == {"class_path"})):
        return {**hparams, "backbone": saved.get("backbone")}
    return hparams


def check_precision(objective: str, precision: object) -> None:
    """Refuse fp16 for an objective registered with ``double_backprop`` (bf16 and fp32 work);
    the CLI (before anything is built) and ``on_fit_start`` both call it.

    Loss scaling protects only the final backward: the input gradient that the regularizer (or
    the AT attack) differentiates is computed unscaled inside the step, and fp16's range (smallest
    normal 6e-5) flushes or coarsens the small per-pixel gradients the ranking is built from.
    bf16 has fp32's exponent range.
    """
    if str(precision) in FP16_PRECISIONS and _double_backprop(objective):
        raise RuntimeError(
            f"trainer.precision={precision!r} (fp16) cannot be used with model.objective={objective!r}: its double "
            "backprop needs the input gradient unscaled, which fp16 loss scaling does not protect from underflow; "
            "use trainer.precision: bf16-mixed (GPU or CPU) or 32-true"
        )


def check_sync_batchnorm(objective: str, sync_batchnorm: bool) -> None:
    """Refuse SyncBatchNorm (``trainer.sync_batchnorm: true``, or SyncBatchNorm layers in the model)
    for an objective registered with ``double_backprop``: SyncBatchNorm has no double backward.
    The CLI (before anything is built) and ``on_fit_start`` both call it."""
    if sync_batchnorm and _double_backprop(objective):
        raise RuntimeError(
            f"trainer.sync_batchnorm=true (SyncBatchNorm) cannot be used with model.objective={objective!r}: "
            "SyncBatchNorm does not support the double backward the objective needs; set trainer.sync_batchnorm: false"
        )


def _double_backprop(objective: str) -> bool:
    """The registry's ``double_backprop`` of ``objective`` (False for an unknown name, which the
    model's constructor refuses with the valid names)."""
    entry = OBJECTIVES.get(objective)
    return entry is not None and entry.double_backprop


def guard_curvature_precision(objective, device_type: str, precision: str) -> tuple[bool, bool] | None:
    """Keep the curvature term's finite difference (g(x + h u) - g(x)) / h above rounding noise.

    With h < ``AUTOCAST_MIN_H`` the step is below the resolution of 16-bit formats and of TF32
    (10-bit mantissa), so R_H would measure rounding (docs/benchmarks.md: ~30x its fp32 value
    under bf16 at h = 1e-3, ~4x with TF32-rounded convolutions). On CUDA in fp32 this turns TF32
    off for the run and returns the previous (cudnn, matmul) flags to restore; with bf16-true
    it warns. Returns None when nothing was changed.
    """
    if not getattr(objective, "curvature", False) or getattr(objective, "h", AUTOCAST_MIN_H) >= AUTOCAST_MIN_H:
        return None
    h = objective.h
    if precision == "bf16-true":  # (under bf16-mixed autocast the objective warns by itself)
        warnings.warn(
            f"precision={precision!r} with the curvature term and h={h}: bf16 rounding swamps the "
            f"finite difference and R_H becomes noise; use h >= {AUTOCAST_MIN_H} or precision 32-true",
            UserWarning,
            stacklevel=2,
        )
        return None
    if device_type != "cuda":
        return None
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if any(saved):
        log.info("curvature term with h=%s: TF32 convolutions/matmuls turned off for this run (their "
                 "10-bit mantissa would swamp the finite difference)", h)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return saved
    return None
