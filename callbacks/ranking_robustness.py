"""RankingRobustness: per-epoch explanation-ranking evaluation (DESIGN §5).

Every ``every_n_epochs`` epochs (and always at the last epoch of ``fit``, and on every
``validate`` run) the callback takes a fixed, seeded evaluation subset of the validation set (the
same images every epoch; sharded across ranks, no duplicates), runs the configured attacks against
each configured explanation method, and logs (``<eps>`` suffix ``/eps_<v*255>`` only when several
budgets are given):

=============================================  ==================================================
``robustness/p_at_k/<attack>/<method>``        P@k, attack ``er`` / ``mse`` (and ``noise``: uniform
                                               noise of the same eps, with ``noise_baseline``)
``robustness/spearman/<attack>/<method>``      Spearman / Kendall on the union of both top-k sets
``robustness/kendall/<attack>/<method>``
``robustness/flip_rate/<attack>/<method>``     attacks: share of samples whose attack was stopped
                                               by a prediction flip (the returned images never
                                               flip); noise: share whose prediction changed
``robustness/thickness/<method>``              Monte-Carlo top-k thickness at ``thickness_eps``
``robustness/localization/<method>``           share of the clean top-k inside the ground-truth
``robustness/localization/<attack>/<method>``  mask, and after the attack (datasets with masks)
=============================================  ==================================================

plus, on rank zero with a ``WandbLogger``, one image grid per attack and method (rows: samples;
columns: clean image, clean saliency, attacked image, attacked saliency) under
``robustness/saliency/<attack>/<method>``.

Values are accumulated in torchmetrics ``Metric`` objects (sum and count per rank) and reduced
across ranks before logging, so a 2-process DDP run logs the same numbers as one process. All
per-sample randomness (random starts, noise, thickness draws) is keyed by (seed, dataset index),
so a sample's result does not depend on its rank or batch.

The analysis runs with the classifier (``pl_module.model`` if present) in eval mode (restored
afterwards) inside ``torch.enable_grad()``; Lightning's ``inference_mode=True`` blocks input
gradients, so the callback refuses it at setup of ``validate`` with a clear message (inside
``fit`` Lightning validates under ``no_grad``, which ``torch.enable_grad()`` lifts). The sanity
check is skipped.

``k``, ``target``, ``pair_set`` and ``pool`` default (``null``) to the LightningModule's
``hparams`` of the same name (else 0.1, ``loss``, ``boundary``, no pooling); ``pool: 1`` forces
no pooling.

Standalone on a trained checkpoint (e.g. 100 attack steps)::

    python train.py validate -c configs/default.yaml --ckpt_path CKPT \\
        --trainer.callbacks+=callbacks.RankingRobustness --trainer.callbacks.steps=100
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from callbacks._eval_subset import EvalBatch, EvalSubset, item_has_mask
from callbacks.metrics import FlipRate, LocalizationShare, PrecisionAtK, SampleMean, TopKThickness, UnionRankCorrelation
from explanations.attacks import ATTACKS, STEPS, build_attack, uniform_in_ball
from explanations.explainers import check_method, eval_mode, explain_with_logits
from explanations.ranking_metrics import CORRELATIONS, topk_thickness
from explanations.regularizers import check_pair_set
from explanations.saliency import check_target

log = logging.getLogger(__name__)

NOISE = "noise"
_NOISE_STREAM = 500


def check_grad_enabled_validation(trainer: L.Trainer, owner: str, stage: str | None = None) -> None:
    """Refuse Lightning's inference mode for validation: input gradients need it off.

    ``stage`` (``fit``/``validate``) checks the loop that stage will use before it runs (Lightning
    validates under ``no_grad`` inside ``fit`` but under the Trainer's ``inference_mode`` in
    ``validate``); without it, the current grad mode is checked.
    """
    if stage == "fit":
        loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    elif stage == "validate":
        loop = getattr(trainer, "validate_loop", None)
    else:
        loop = None
    if getattr(loop, "inference_mode", False) or torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{owner} needs input gradients during validation, but the Trainer runs validation under "
            "torch.inference_mode. Set `trainer.inference_mode: false` in the config "
            "(or Trainer(inference_mode=False))."
        )


def _eps_tag(eps: float) -> str:
    return f"eps_{eps * 255:.3g}"


def _heat(s: Tensor, size: tuple[int, int]) -> Tensor:
    """Saliency (N, n) -> grey heat map images (N, 3, H, W) in [0, 1], each scaled by its max."""
    n = s.shape[1]
    h, w = size
    side_h = int(round((n * h / w) ** 0.5))
    side_w = n // max(side_h, 1)
    maps = s.view(-1, 1, side_h, side_w).float()
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    if (side_h, side_w) != (h, w):
        maps = F.interpolate(maps, size=(h, w), mode="nearest")
    return maps.expand(-1, 3, -1, -1)


class RankingRobustness(L.Callback):
    """Attack the explanation ranking on a fixed validation subset and log P@k and thickness.

    Args:
        every_n_epochs: evaluate after every n-th training epoch (and after the last one).
        num_samples: size of the evaluation subset (over all ranks). batch_size: per forward.
        seed: picks the subset and keys all per-sample noise.
        attacks: names from ``explanations.attacks.ATTACKS`` (``er``, ``mse``).
        methods: explanation methods (``gradient``, ``grad_x_input``, ``smoothgrad``,
            ``integrated_gradients``); ``method_kwargs`` maps a method to its options.
        eps: l_inf budget (pixel units) or a list of budgets (a P@k curve).
        steps, step_size, step, random_start, surrogate_beta: attack settings (``step_size``
            default 2.5 eps / steps; ``random_start`` null = the attack's default).
        k, pair_set, target, pool: see the module docstring (null = the LightningModule's).
        noise_baseline: also evaluate uniform noise of each eps (attack name ``noise``).
        correlations: log Spearman and Kendall on the union of the top-k sets.
        thickness: log the Monte-Carlo top-k thickness with ``thickness_samples`` draws of
            ``thickness_points`` points each, at ``thickness_eps`` (default: the largest eps).
        localization: log the top-k share inside the ground-truth mask when the data has masks.
        log_images: log clean vs attacked saliency grids (``num_images`` samples) to W&B.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        attacks: list[str] | None = None,
        methods: list[str] | None = None,
        eps: float | list[float] = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        step: str = "sign",
        random_start: bool | None = None,
        surrogate_beta: float | None = None,
        k: int | float | None = None,
        pair_set: str | None = None,
        target: str | None = None,
        pool: int | None = None,
        noise_baseline: bool = True,
        correlations: bool = True,
        thickness: bool = True,
        thickness_samples: int = 2,
        thickness_points: int = 4,
        thickness_eps: float | None = None,
        localization: bool = True,
        log_images: bool = True,
        num_images: int = 8,
        method_kwargs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.attacks = list(attacks) if attacks is not None else ["er"]
        self.methods = list(methods) if methods is not None else ["gradient"]
        self.eps = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
        self.method_kwargs = {m: dict(v) for m, v in (method_kwargs or {}).items()}
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1")
        if not self.eps or any(not e >= 0 for e in self.eps):
            raise ValueError(f"eps={eps!r} must be a non-negative budget or a non-empty list of them")
        for name in self.attacks:
            if name not in ATTACKS:
                raise ValueError(f"attack {name!r} is not known; valid: {sorted(ATTACKS)}")
        unknown = sorted(set(self.method_kwargs) - set(self.methods))
        if unknown:
            raise ValueError(f"method_kwargs given for {unknown}, which are not in methods={self.methods}")
        for method in self.methods:
            check_method(method, self.method_kwargs.get(method))
        if step not in STEPS:
            raise ValueError(f"step={step!r} is not known; valid: {STEPS}")
        if pair_set is not None:
            check_pair_set(pair_set)
        if target is not None:
            check_target(target)
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                            ("thickness_samples", thickness_samples), ("thickness_points", thickness_points)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r} must be a non-negative integer")
        self.every_n_epochs, self.num_samples, self.batch_size, self.seed = every_n_epochs, num_samples, batch_size, seed
        self.steps, self.step_size, self.step = steps, step_size, step
        self.random_start, self.surrogate_beta = random_start, surrogate_beta
        self.k, self.pair_set, self.target, self.pool = k, pair_set, target, pool
        self.noise_baseline, self.correlations = noise_baseline, correlations
        self.thickness, self.thickness_samples, self.thickness_points = thickness, thickness_samples, thickness_points
        self.thickness_eps = thickness_eps
        self.localization, self.log_images, self.num_images = localization, log_images, num_images
        self._subset: EvalSubset | None = None
        self._subset_key: tuple | None = None
        self._last_epoch: int | None = None
        self.last_duration_s: float = 0.0
        self.total_duration_s: float = 0.0
        self.last_values: dict[str, float] = {}
        self.evaluated_epochs: list[int] = []

    # ------------------------------------------------------------------ settings
    def _setting(self, pl_module: L.LightningModule, name: str, default: Any) -> Any:
        value = getattr(self, name)
        if value is not None:
            return value
        hparams = getattr(pl_module, "hparams", {}) or {}
        return hparams.get(name, default) if hasattr(hparams, "get") else default

    def _resolved(self, pl_module: L.LightningModule) -> dict[str, Any]:
        pool = self._setting(pl_module, "pool", None)
        return dict(
            k=self._setting(pl_module, "k", 0.1),
            pair_set=self._setting(pl_module, "pair_set", "boundary"),
            target=self._setting(pl_module, "target", "loss"),
            pool=None if pool is None or pool <= 1 else int(pool),
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate"):
            check_grad_enabled_validation(trainer, type(self).__name__, stage)

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return trainer.state.fn == TrainerFn.VALIDATING
        epoch = trainer.current_epoch
        if self._last_epoch == epoch:  # validation ran more than once this epoch
            return False
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._due(trainer):
            return
        check_grad_enabled_validation(trainer, type(self).__name__)
        self._last_epoch = trainer.current_epoch if trainer.state.fn == TrainerFn.FITTING else None
        start = time.perf_counter()
        values, images = self.evaluate(trainer, pl_module)
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.last_values = {n: float(v) for n, v in values.items()}
        self.evaluated_epochs.append(trainer.current_epoch)
        if images and trainer.is_global_zero:
            self._log_images(trainer, images)
        self.last_duration_s = time.perf_counter() - start
        self.total_duration_s += self.last_duration_s

    # ------------------------------------------------------------------ evaluation
    def _dataset(self, trainer: L.Trainer):
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, "val_dataset", None) if datamodule is not None else None
        if dataset is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise RuntimeError(
                "RankingRobustness needs a validation dataset: a datamodule with `val_dataset` "
                "(after setup) or a validation dataloader with a `.dataset`"
            )
        return dataset

    def _eval_subset(self, trainer: L.Trainer) -> EvalSubset:
        dataset = self._dataset(trainer)
        key = (id(dataset), trainer.global_rank, trainer.world_size)
        if self._subset is None or self._subset_key != key:
            self._subset = EvalSubset(
                dataset, self.num_samples, self.seed, trainer.global_rank, trainer.world_size, self.batch_size
            )
            self._subset_key = key
        return self._subset

    def build_metrics(self, has_mask: bool, settings: dict[str, Any]) -> dict[str, SampleMean]:
        """Every metric this configuration logs (the same on every rank), freshly reset."""
        k, pool = settings["k"], settings["pool"]
        multi = len(self.eps) > 1
        metrics: dict[str, SampleMean] = {}
        sources = list(self.attacks) + ([NOISE] if self.noise_baseline else [])
        for method in self.methods:
            if self.thickness:
                metrics[f"robustness/thickness/{method}"] = TopKThickness()
            if has_mask and self.localization:
                metrics[f"robustness/localization/{method}"] = LocalizationShare(k, pool)
            for eps in self.eps:
                tag = f"/{_eps_tag(eps)}" if multi else ""
                for source in sources:
                    suffix = f"{source}/{method}{tag}"
                    metrics[f"robustness/p_at_k/{suffix}"] = PrecisionAtK(k)
                    if self.correlations:
                        for corr in CORRELATIONS:
                            metrics[f"robustness/{corr}/{suffix}"] = UnionRankCorrelation(k, corr)
                    metrics[f"robustness/flip_rate/{suffix}"] = FlipRate()
                    if has_mask and self.localization:
                        metrics[f"robustness/localization/{suffix}"] = LocalizationShare(k, pool)
        return metrics

    def _attack(self, name: str, model: nn.Module, method: str, eps: float, settings: dict[str, Any]):
        return build_attack(
            name, model, eps=eps, steps=self.steps, step_size=self.step_size, k=settings["k"],
            pair_set=settings["pair_set"], method=method, method_kwargs=self.method_kwargs.get(method),
            target=settings["target"], pool=settings["pool"], step=self.step,
            random_start=self.random_start, seed=self.seed, surrogate_beta=self.surrogate_beta,
        )

    @torch.no_grad()
    def _no_grad_forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(x)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict[str, Tensor], dict]:
        """Run the evaluation; returns the reduced values and rank zero's image material."""
        model = getattr(pl_module, "model", pl_module)
        subset = self._eval_subset(trainer)
        settings = self._resolved(pl_module)
        metrics = self.build_metrics(subset.has_mask, settings)
        for metric in metrics.values():
            metric.to(pl_module.device)
        params = next(iter(model.parameters()), None)
        dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
        explain_args = dict(target=settings["target"], pool=settings["pool"])
        thickness_eps = self.thickness_eps if self.thickness_eps is not None else max(self.eps)
        multi = len(self.eps) > 1
        images: dict[str, dict[str, Tensor]] = {}
        image_eps = max(self.eps)
        with torch.enable_grad(), eval_mode(model):
            for b_idx, batch in enumerate(subset):
                batch = batch.to(pl_module.device, dtype)
                x, y, mask, ids = batch.x, batch.y, batch.mask, batch.ids
                for method in self.methods:
                    mkw = self.method_kwargs.get(method, {})
                    clean = explain_with_logits(model, x, y, method, **explain_args, **mkw)
                    s0 = clean.saliency.detach()
                    if self.thickness:
                        metrics[f"robustness/thickness/{method}"].update(topk_thickness(
                            model, x, y, settings["k"], thickness_eps, self.thickness_samples,
                            self.thickness_points, method, settings["target"], settings["pool"], ids,
                            self.seed, mkw, s_clean=s0, classes=clean.logits.detach().argmax(1),
                        ))
                    if mask is not None and self.localization:
                        metrics[f"robustness/localization/{method}"].update(s0, mask)
                    for eps in self.eps:
                        tag = f"/{_eps_tag(eps)}" if multi else ""
                        runs: list[tuple[str, Tensor, Tensor]] = []
                        for name in self.attacks:
                            attack = self._attack(name, model, method, eps, settings)
                            x_adv = attack(x, y, ids=ids)
                            runs.append((name, x_adv, attack.flipped.float()))
                        if self.noise_baseline:
                            x_noise = uniform_in_ball(x, eps, ids, self.seed, stream=_NOISE_STREAM)
                            flips = (self._no_grad_forward(model, x_noise).argmax(1) != clean.logits.argmax(1)).float()
                            runs.append((NOISE, x_noise, flips))
                        for name, x_adv, flips in runs:
                            s_adv = explain_with_logits(model, x_adv, y, method, **explain_args, **mkw).saliency.detach()
                            suffix = f"{name}/{method}{tag}"
                            metrics[f"robustness/p_at_k/{suffix}"].update(s0, s_adv)
                            if self.correlations:
                                for corr in CORRELATIONS:
                                    metrics[f"robustness/{corr}/{suffix}"].update(s0, s_adv)
                            metrics[f"robustness/flip_rate/{suffix}"].update(flips)
                            if mask is not None and self.localization:
                                metrics[f"robustness/localization/{suffix}"].update(s_adv, mask)
                            if (self.log_images and b_idx == 0 and trainer.is_global_zero
                                    and eps == image_eps and name != NOISE):
                                n = min(self.num_images, x.shape[0])
                                images[f"{name}/{method}"] = dict(
                                    x=x[:n].detach().cpu(), s=s0[:n].cpu(), x_adv=x_adv[:n].detach().cpu(),
                                    s_adv=s_adv[:n].cpu(),
                                )
        # every rank computes every metric in the same (sorted) order: one reduction each
        values = {name: metrics[name].compute() for name in sorted(metrics)}
        return values, images

    # ------------------------------------------------------------------ images
    def _log_images(self, trainer: L.Trainer, images: dict[str, dict[str, Tensor]]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        from torchvision.utils import make_grid

        for key, item in images.items():
            x, x_adv = item["x"].float(), item["x_adv"].float()
            size = tuple(x.shape[-2:])
            if x.shape[1] == 1:
                x, x_adv = x.expand(-1, 3, -1, -1), x_adv.expand(-1, 3, -1, -1)
            rows = torch.stack([x[:, :3], _heat(item["s"], size), x_adv[:, :3], _heat(item["s_adv"], size)], 1)
            tiles = rows.flatten(0, 1)
            scale = max(1, 64 // max(size))
            if scale > 1:
                tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
            grid = make_grid(tiles.clamp(0, 1), nrow=4, padding=2, pad_value=1.0)
            caption = f"epoch {trainer.current_epoch}: clean | clean saliency | attacked ({key}) | attacked saliency"
            for logger in loggers:
                try:
                    logger.log_image(key=f"robustness/saliency/{key}", images=[grid], caption=[caption],
                                     step=trainer.global_step)
                except Exception as exc:  # images are a convenience; never kill a run over them
                    log.warning("RankingRobustness: could not log images to W&B: %s", exc)
