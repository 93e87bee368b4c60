"""Presets of the frontier study: what is trained, how long, and how it is evaluated.

Three presets (``smoke``, ``cpu``, ``gpu``) are plain dataclasses, so every number behind
docs/results.md is in this committed file; ``--set key=value`` on the command line overrides a
field for experiments (the override is recorded in the results JSON and the report).

The study (docs/results.md states it): one vanilla ReLU start (the published CIFAR ResNet-20
adapted to the JPEG images, or a model trained from scratch), then every method fine-tuned from
it over a **sweep of its strength** (``TaskConfig.frontier``, weakest first) for the same epochs
on the same images with the same optimizer (SGD, momentum 0.9, Nesterov, cosine schedule, no
weight decay unless the method is WD), ``seeds`` training seeds per setting, and
``near_seeds`` for the settings next to the matched accuracies (``pipeline.near_settings``).
Every model is evaluated on the same test images; methods are compared at matched
validation accuracy (``explanations.statistics.matched_bootstrap``).

- ``vanilla``: CE, ReLU (continued training; an anchor, one setting). ``wd``: CE, ReLU, weight
  decay (an anchor).
- ``sp``: CE with every ReLU swapped for Softplus(beta), swept over beta (smaller = smoother).
- Every regularizer (Est-H, grad-norm, R2ET\\H, R2ET) and AT fine-tune the *Softplus(beta =
  ``softplus_beta``)* network, so each of their curves starts at weight 0 = the SP run at that
  beta (the same training with the regularizer off), which the curves share.
- R2ET family and Est-H use the adaptive weights (``lambda = w (CE + 1) / |R|``); grad-norm uses
  ``w ||g||^2`` with a fixed w.
- AT trains against the R2ET reference code's attack (``units: normalized``, one l2 step of
  ``at_step`` normalised units, box = the step; the reference strength is 1) on each image, then
  CE on the attacked image; larger steps are the stronger settings of its curve.
- Validation: ``val_size`` images of CIFAR-10's *test* split (class-balanced, seeded; the
  pretrained model never saw them) give the accuracy axis and every choice (the matched
  accuracies, the near settings); the other test images give the test accuracy and the attack
  images. Nothing is chosen on test images.

The cost model (``COSTS``) holds the per-stage costs measured on the 2-core CPU machine with 2
threads (the committed cpu run of the earlier study, docs/results_resnet20_points/results_cpu.json);
:func:`estimate` turns a task into seconds per stage kind, printed at the start of a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

# Display names and the training recipe of each method of the study.
METHOD_NAMES: dict[str, str] = {
    "vanilla": "Vanilla",
    "wd": "WD",
    "sp": "SP",
    "est_h": "Est-H",
    "grad_norm": "Grad-norm",
    "r2et_noh": "R2ET\\H",
    "r2et": "R2ET",
    "r2et_mm": "R2ET-mm",
    "at": "AT",
}

# method -> (objective, activation, swept hyper-parameter)
METHOD_RECIPES: dict[str, tuple[str, str, str | None]] = {
    "vanilla": ("vanilla", "relu", None),
    "wd": ("vanilla", "relu", "weight_decay"),
    "sp": ("vanilla", "softplus", "softplus_beta"),
    "est_h": ("est_h", "softplus", "weight"),
    "grad_norm": ("grad_norm", "softplus", "weight"),
    "r2et_noh": ("r2et_noh", "softplus", "weight"),
    "r2et": ("r2et", "softplus", "weight"),
    "r2et_mm": ("r2et_mm", "softplus", "weight"),
    "at": ("at", "softplus", "at_step"),
}

#: Short names of the swept parameters (setting labels such as ``w=0.1``).
PARAM_SHORT = {"weight": "w", "weight_decay": "wd", "softplus_beta": "beta", "at_step": "step"}

#: AT at the strength of the R2ET reference code (ccha005/R2ET ``batch_retrain.retrain``, mode
#: ``at``: ``PGD_m(model, x, y, 1, 'topk', ..., epsilon=1)``): one ranking-attack step of l2 length
#: ``at_step`` (the swept value; 1 = the reference) in the model's normalised input space, box =
#: the step, no pixel clipping. In pixels one normalised unit is one std (computed from the model's
#: own normalisation, about 0.226 for the ImageNet statistics of the published ResNet-20).
PAPER_AT = {"steps": 1, "step": "l2", "units": "normalized"}

#: The matched comparisons: (a, b) reads "a minus b". Anchors (one setting) are compared at their
#: own accuracy, sweeps at every matched accuracy both curves reach.
MATCHED_PAIRS: tuple[tuple[str, str], ...] = (
    ("r2et", "est_h"), ("r2et", "sp"), ("r2et", "grad_norm"), ("r2et", "at"), ("r2et", "r2et_noh"),
    ("r2et_noh", "sp"), ("est_h", "sp"), ("r2et", "vanilla"), ("r2et", "wd"),
)

#: Measured costs (ms, wall, 2 threads on 2 idle cores of the CPU machine; from the stage records
#: of the earlier cpu run, docs/results_resnet20_points/results_cpu.json: a ResNet-20 at batch 128
#: / 100). ``train_ms``: per image and epoch of a fine-tune (R2ET 158-181 s, R2ET\H 84 s, SP 36 s,
#: AT 105 s per 10k images); ``fit_overhead_s``: Trainer and data set-up per fit (s);
#: ``forward_ms``: one forward per image (accuracy: 13 s per 10k); ``attack_step_ms``: one step of
#: one ensemble attack (ER or MSE) per image on a Softplus model (R2ET: 111 s for 2 attacks x 4
#: budgets x 10 steps x 200 images), ``relu_factor``: a ReLU model's attacks over that (ER, its
#: surrogate and MSE: 231 s); ``noise_ms``: the noise baseline per budget and image;
#: ``thickness_ms``: one thickness point per image; ``paper_step_ms``: one step of the
#: paper-protocol attack per image (25 s for 100 steps on 40 images).
COSTS: dict[str, Any] = {
    "train_ms": {"vanilla": 3.4, "wd": 3.4, "sp": 3.6, "est_h": 17.0, "r2et": 17.0, "r2et_mm": 18.0,
                 "r2et_noh": 8.5, "grad_norm": 8.5, "at": 10.5},
    "pretrain_ms": 3.5, "fit_overhead_s": 8.0, "forward_ms": 1.3, "attack_step_ms": 6.9, "relu_factor": 2.1,
    "noise_ms": 7.0, "thickness_ms": 3.1, "paper_step_ms": 6.2,
}


@dataclass
class EvalConfig:
    """How one trained model is evaluated (all on fixed class-balanced test images).

    Every model: clean accuracy on ``test_acc_size`` test images (None: every test image of the
    split); on the first ``size`` of them the protocol's default ensemble (ER, ER through a
    Softplus surrogate for ReLU-type models, MSE, uniform noise) at every budget of ``eps_list``
    with ``steps`` steps each (APGD step-size schedule), the per-image worst case, boundary and
    all-pairs thickness at ``eps`` (``thickness_samples`` x ``thickness_points``, 0 samples: off);
    the paper-protocol attack (``explanations.attacks.PaperERAttack``: ``paper_steps`` l2 steps of
    ``paper_step_size`` in normalised units, first flip) on the first ``paper_size`` images.
    Extras (seed 0 of each setting, when their sizes are > 0): ``check_size`` images attacked with
    ``check_steps`` steps at ``eps`` (does ``steps`` leave robustness on the table?); ER on
    SmoothGrad / IG explanations on ``explainer_size`` images; PSE (targeted PGD, C&W margin,
    random target) on ``pse_size``. ``relu_surrogate`` / ``surrogate_beta``: the validation ER
    (DESIGN §5) on ReLU models.
    """

    size: int = 500
    batch_size: int = 100
    steps: int = 20
    eps: float = 8 / 255
    eps_list: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    relu_surrogate: tuple[str, ...] = ("er",)
    surrogate_beta: float = 10.0
    thickness_samples: int = 8
    thickness_points: int = 4
    check_size: int = 0
    check_steps: int = 100
    paper_size: int = 200
    paper_steps: int = 100
    paper_step_size: float = 5e-3
    explainer_size: int = 0
    explainer_steps: int = 20
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15
    ig_steps: int = 16
    pse_size: int = 0
    pse_steps: int = 20
    pse_group_size: int = 8
    test_acc_size: int | None = None
    seed: int = 0


@dataclass
class TaskConfig:
    """One data set: model, training budget, the frontier, seeds and evaluation.

    ``pretrained``: the first stage adapts published weights (``--weights-file``) with a vanilla
    fine-tune of ``pretrain_epochs`` on ``train_size`` train images instead of training from
    scratch. ``frontier``: method -> swept values, weakest first (``None`` for vanilla); every
    setting is fine-tuned with training seeds 0 .. ``seeds`` - 1, and the settings next to the
    matched accuracies (``pipeline.near_settings``) with seeds up to ``near_seeds`` - 1.
    ``matched_drops``: the matched accuracies, in points below ``matched_reference``'s first
    setting (its seed-mean val accuracy). ``val_size``: images of CIFAR-10's test split held out
    for validation (seeded by ``split_seed``, class-balanced); the rest is the test half.
    ``at_kwargs``: AT's training attack (the swept ``at_step`` is its ``step_size``).
    """

    dataset: str = "cifar10"
    backbone: str = "resnet9"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 64})
    pretrained: bool = False
    image_size: int = 32
    k: int | float = 100
    pool: int | None = None
    softplus_beta: float = 10.0
    train_size: int = 50000  # class-balanced subset of the train split (pretraining)
    finetune_size: int | None = None  # images per fine-tune epoch (None: train_size)
    val_size: int = 5000  # of the test split, for validation
    split_seed: int = 0
    augment: bool = True
    batch_size: int = 128
    num_workers: int = 4
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.05
    pretrain_weight_decay: float = 5e-4
    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    frontier: dict[str, list[float | None]] = field(default_factory=dict)
    seeds: int = 2
    near_seeds: int = 3
    matched_drops: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)
    matched_reference: str = "sp"
    matched_resamples: int = 10000
    at_kwargs: dict[str, Any] = field(default_factory=lambda: dict(PAPER_AT))
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class Preset:
    name: str
    description: str
    cifar: TaskConfig
    accelerator: str = "auto"


#: The cpu frontier (weakest setting first). Weights span "no accuracy cost" to "clearly too
#: strong" on the earlier run's validation numbers (R2ET / Est-H w = 0.5 and grad-norm w = 0.01
#: cost 10-25 points after one epoch).
CPU_FRONTIER: dict[str, list[float | None]] = {
    "vanilla": [None],
    "wd": [5e-3],
    "sp": [10.0, 5.0],
    "est_h": [0.05, 0.1, 0.2, 0.3, 0.5],
    "r2et": [0.05, 0.1, 0.2, 0.3, 0.5],
    "r2et_noh": [0.1, 0.3, 1.0, 3.0, 10.0],
    "grad_norm": [3e-4, 1e-3, 2e-3, 4e-3, 1e-2],
    "at": [1.0, 2.0, 4.0],
}


def _cpu_cifar() -> TaskConfig:
    return TaskConfig(
        backbone="resnet20", backbone_kwargs={}, pretrained=True, softplus_beta=10.0,
        train_size=50000, finetune_size=2000, val_size=5000, batch_size=128, num_workers=0,
        pretrain_epochs=1, pretrain_lr=0.01, finetune_epochs=3, finetune_lr=0.01,
        frontier={m: list(v) for m, v in CPU_FRONTIER.items()}, seeds=2, near_seeds=3, matched_drops=(1.0, 2.0, 3.0),
        eval=EvalConfig(size=80, batch_size=80, steps=10, thickness_samples=4, thickness_points=4,
                        paper_size=32, test_acc_size=None),
    )


def _gpu_cifar() -> TaskConfig:
    # Paper scale: ResNet-9 width 64 trained from scratch on all of CIFAR-10's train split, 10-epoch
    # fine-tunes on all of it (the reference retrains 10 epochs), 3 seeds everywhere.
    return TaskConfig(
        frontier={
            "vanilla": [None], "wd": [5e-4, 5e-3], "sp": [10.0, 5.0, 2.0],
            "est_h": [0.03, 0.1, 0.2, 0.3, 0.5, 1.0], "r2et": [0.03, 0.1, 0.2, 0.3, 0.5, 1.0],
            "r2et_noh": [0.1, 0.3, 1.0, 3.0, 10.0], "grad_norm": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            "at": [1.0, 2.0, 4.0],
        },
        finetune_epochs=10, seeds=3, near_seeds=5,
        eval=EvalConfig(size=1000, batch_size=250, steps=20, paper_size=1000, check_size=200, pse_size=500),
    )


def _smoke_cifar() -> TaskConfig:
    return TaskConfig(
        backbone_kwargs={"width": 8}, train_size=400, finetune_size=200, val_size=100, batch_size=50,
        num_workers=0, pretrain_epochs=1, finetune_epochs=1,
        frontier={"vanilla": [None], "sp": [10.0, 5.0], "r2et": [0.1, 1.0], "at": [1.0]},
        seeds=2, near_seeds=3, matched_drops=(1.0, 5.0), matched_resamples=200,
        eval=EvalConfig(size=20, batch_size=20, steps=3, eps_list=(2 / 255, 8 / 255), thickness_samples=2,
                        thickness_points=2, paper_size=6, paper_steps=5, test_acc_size=100),
    )


def estimate(task: TaskConfig) -> dict[str, float]:
    """Seconds per stage kind from :data:`COSTS` (see there) on the preset's sizes: ``pretrain``,
    ``finetune`` (every setting x ``seeds``), ``near`` (an upper bound: per swept method the
    ``len(matched_drops) + 1`` settings next to the matched accuracies, or all of its settings,
    times the extra seeds; anchors too), ``eval`` (every model), ``total``."""
    c, e = COSTS, task.eval
    ft_images = (task.finetune_size or task.train_size) * task.finetune_epochs
    val_s = task.val_size * c["forward_ms"] / 1000

    def fit(method: str) -> float:
        return c["fit_overhead_s"] + ft_images * c["train_ms"][method] / 1000 + val_s

    def evaluate(method: str) -> float:
        relu = METHOD_RECIPES[method][1] == "relu"
        n_test = e.test_acc_size if e.test_acc_size is not None else 10000 - task.val_size
        attack = e.size * len(e.eps_list) * (2 * e.steps * c["attack_step_ms"] * (c["relu_factor"] if relu else 1.0)
                                             + c["noise_ms"])
        thick = e.size * e.thickness_samples * e.thickness_points * c["thickness_ms"]
        paper = e.paper_size * e.paper_steps * c["paper_step_ms"]
        return (n_test * c["forward_ms"] + attack + thick + paper) / 1000

    extra = max(0, task.near_seeds - task.seeds)
    out = {"pretrain": task.train_size * task.pretrain_epochs * c["pretrain_ms"] / 1000 + c["fit_overhead_s"] + 2 * val_s,
           "finetune": 0.0, "near": 0.0, "eval": 0.0}
    models = 0
    for method, values in task.frontier.items():
        near = min(len(values), len(task.matched_drops) + 1)
        out["finetune"] += len(values) * task.seeds * fit(method)
        out["near"] += near * extra * fit(method)
        n = len(values) * task.seeds + near * extra
        out["eval"] += n * evaluate(method)
        models += n
    out["total"] = sum(out.values())
    out["models"] = float(models)
    return out


def _describe(what: str, task: TaskConfig) -> str:
    est = estimate(task)
    return f"{what}; estimated {est['total'] / 3600:.1f} h on 2 idle CPU cores with 2 threads (presets.estimate)"


def build_preset(name: str) -> Preset:
    """A fresh preset object by name (see ``PRESETS``)."""
    if name == "smoke":
        return Preset("smoke", "pipeline check only: tiny model, data and attacks (numbers are not meaningful)",
                      _smoke_cifar(), accelerator="cpu")
    if name == "cpu":
        task = _cpu_cifar()
        return Preset("cpu", _describe(
            "the published CIFAR ResNet-20 adapted to the JPEG images (1 epoch on 50k), then frontiers of 3-epoch "
            "fine-tunes on 2k images (R2ET, Est-H, R2ET\\H, grad-norm: 5 weights; SP: beta 10, 5; AT: steps 1, 2, 4 "
            "normalised units; vanilla and WD anchors), 2 training seeds per setting and 3 next to the matched "
            "accuracies (1, 2, 3 points below SP), 5k test images for validation, 80 attack images at 1/2/4/8 /255 "
            "and 32 for the paper protocol", task), task, accelerator="cpu")
    if name == "gpu":
        return Preset("gpu", "one GPU, paper scale: ResNet-9 width 64 trained from scratch on all 50k train images, "
                      "10-epoch fine-tunes on all of them, 5-6 settings per method, 3 training seeds (5 next to the "
                      "matched accuracies), 1000 attack images", _gpu_cifar(), accelerator="auto")
    raise ValueError(f"preset={name!r} is not known; valid: {', '.join(PRESETS)}")


PRESETS = ("smoke", "cpu", "gpu")


def apply_override(preset: Preset, assignment: str) -> None:
    """Apply ``dotted.key=value`` (value parsed as YAML) in place, e.g. ``cifar.eval.size=50``."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected key=value, e.g. cifar.pretrain_epochs=2")
    key, text = assignment.split("=", 1)
    value = yaml.safe_load(text)
    parts = key.strip().split(".")
    obj: Any = preset
    for part in parts[:-1]:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"--set {assignment!r}: no field {part!r}")
    last = parts[-1]
    if isinstance(obj, dict):
        obj[last] = value
        return
    _assign(obj, last, value, assignment)


def _assign(obj: Any, name: str, value: Any, assignment: str) -> None:
    """Set a dataclass field; a mapping given for a nested dataclass updates its fields."""
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"--set {assignment!r}: {type(obj).__name__} has no field {name!r}")
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current) and isinstance(value, dict):
        for key, item in value.items():
            _assign(current, key, item, assignment)
        return
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(obj, name, value)
