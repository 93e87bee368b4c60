"""Presets of the reproduction study: what is trained, how long, and how it is evaluated.

Three presets (``smoke``, ``cpu``, ``full``) are plain dataclasses, so every number behind
docs/results.md is in this committed file; ``--set key=value`` on the command line overrides a field
for experiments (the override is recorded in the results JSON and the report).

Method choices (the same in every preset; docs/results.md states them):

- Every fine-tune starts from one vanilla ReLU checkpoint (``pretrain``) and runs the same number of
  epochs on the same images with the same optimizer (SGD, momentum 0.9, Nesterov, cosine schedule,
  *no* weight decay unless the method is WD).
- ``vanilla``: CE, ReLU (continued training). ``wd``: CE, ReLU, weight decay swept.
- ``sp``: CE with every ReLU swapped for Softplus(beta) (``softplus_beta``).
- Every regularizer (Est-H, grad-norm, R2ET\\H, R2ET, R2ET-mm) and AT fine-tune the *Softplus*
  network (the paper fine-tunes R2ET with Softplus; with ReLU the curvature term is ~0). So SP is
  the exact control for the activation swap: regularizer - SP = the regularizer's own effect.
- R2ET family and Est-H use the adaptive weights (``lambda = w (CE + 1) / |R|``); grad-norm uses
  ``w ||g||^2`` with a fixed w (it has no adaptive form in the library).
- A method's weight is chosen on the validation split: every grid value is trained, then the one
  with the highest val P@k under a short ERAttack among those whose val accuracy is at most
  ``accuracy_floor`` points below vanilla's is kept (if none is, the most accurate one, flagged).
  ``inherit``: a method without its own grid reuses another method's selected value, without a
  floor check of its own (only the ``smoke`` preset does this, to stay fast; the report says so).
  The ``cpu`` and ``full`` presets sweep every weighted method.
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
    "at": ("at", "softplus", "at_eps"),
}


@dataclass
class EvalConfig:
    """How one trained model is evaluated (all on a fixed class-balanced test subset).

    size: images of the main evaluation (accuracy, ERAttack, MSE attack, thickness).
    attack_steps: T of the main attacks; eps: their l_inf budget (pixel units).
    relu_surrogate: attacks (``er``/``mse``) that are *also* run through a Softplus(beta) copy of a
        ReLU model (``surrogate_beta``; DESIGN §5): the per-sample worse of the direct and the
        surrogate attack is the headline number for ReLU models.
    eps_list / eps_curve_steps / eps_curve_size: P@k vs eps (ERAttack and uniform noise).
    steps_curve / steps_curve_size: P@k vs ERAttack steps (the first images of the subset).
    thickness_*: Monte-Carlo top-k thickness (samples x points on the segment) at ``eps``.
    explainer_*: ERAttack on SmoothGrad / Integrated Gradients explanations, P@k of the same method.
    pse_*: targeted PGD (C&W margin, random target) and the PSE category shares.
    test_acc_size: class-balanced test images for the clean accuracy (forward passes only).
    """

    size: int = 500
    batch_size: int = 100
    attack_steps: int = 100
    eps: float = 8 / 255
    relu_surrogate: tuple[str, ...] = ("er", "mse")
    surrogate_beta: float = 10.0
    eps_list: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    eps_curve_steps: int = 20
    eps_curve_size: int = 200
    steps_curve: tuple[int, ...] = (5, 10, 20, 50, 100)
    steps_curve_size: int = 200
    thickness_size: int = 500
    thickness_samples: int = 8
    thickness_points: int = 4
    explainer_size: int = 200
    explainer_steps: int = 50
    smoothgrad_samples: int = 16
    smoothgrad_noise: float = 0.15
    ig_steps: int = 16
    pse_size: int = 200
    pse_steps: int = 20
    pse_group_size: int = 8
    test_acc_size: int = 10000
    seed: int = 0


@dataclass
class TaskConfig:
    """One data set: model, training budget, sweep and evaluation."""

    dataset: str = "cifar10"  # cifar10 | imagenette
    backbone: str = "resnet9"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 64})
    image_size: int = 32
    k: int | float = 100
    pool: int | None = None
    softplus_beta: float = 5.0
    train_size: int = 45000  # class-balanced subset of the train split (after the val carve-out)
    finetune_size: int | None = None  # images per fine-tune epoch (None: train_size)
    val_size: int = 5000  # val images for the accuracy floor
    val_fraction: float = 0.1
    augment: bool = True
    batch_size: int = 128
    num_workers: int = 4
    pretrain_epochs: int = 30
    pretrain_lr: float = 0.05
    pretrain_weight_decay: float = 5e-4
    finetune_epochs: int = 5
    finetune_lr: float = 0.01
    methods: tuple[str, ...] = tuple(METHOD_NAMES)
    grids: dict[str, list[float]] = field(default_factory=dict)
    defaults: dict[str, float] = field(default_factory=dict)
    inherit: dict[str, str] = field(default_factory=dict)
    at_steps: int = 3
    accuracy_floor: float = 2.0  # points below vanilla's val accuracy
    sweep_eval_size: int = 200  # val images for the sweep's P@k
    sweep_attack_steps: int = 20
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class Preset:
    name: str
    description: str
    cifar: TaskConfig
    imagenette: TaskConfig | None
    accelerator: str = "auto"
    threads: int | None = None


def _cpu_cifar() -> TaskConfig:
    # Budget (measured per image on one contended core, see docs/results.md for the run's own
    # timings): pretrain ~2.7 ms/image-epoch; fine-tune ~2.6 ms/image (CE), ~6 (grad-norm),
    # ~13-15 (Est-H, R2ET family), ~16 (AT, 3 steps); ERAttack ~4-5 ms/image-step.
    return TaskConfig(
        backbone_kwargs={"width": 16},
        train_size=20000,
        finetune_size=5000,
        val_size=2000,
        batch_size=128,
        num_workers=0,
        pretrain_epochs=6,
        pretrain_lr=0.05,
        finetune_epochs=2,
        finetune_lr=0.01,
        grids={
            "wd": [5e-3, 5e-2],
            "est_h": [0.03, 0.1],
            "grad_norm": [0.03, 0.1],
            "r2et_noh": [0.03, 0.1],
            "r2et": [0.03, 0.1],
            "r2et_mm": [0.03, 0.1],
        },
        defaults={"sp": 5.0, "at": 8 / 255},
        sweep_eval_size=100,
        sweep_attack_steps=10,
        eval=EvalConfig(
            size=100,
            attack_steps=100,
            relu_surrogate=("er", "mse"),
            eps_curve_steps=10,
            eps_curve_size=50,
            steps_curve=(10, 50, 100),
            steps_curve_size=100,
            thickness_size=100,
            thickness_samples=4,
            thickness_points=4,
            explainer_size=40,
            explainer_steps=20,
            smoothgrad_samples=8,
            ig_steps=8,
            pse_size=100,
            pse_steps=10,
            pse_group_size=8,
            test_acc_size=2000,
        ),
    )


def _cpu_imagenette() -> TaskConfig:
    # ~34 ms/image-epoch pretraining, ~160 ms/image R2ET fine-tuning, ~45 ms/image-step ERAttack
    # (timm's test_resnet, 224 px, one core).
    return TaskConfig(
        dataset="imagenette",
        backbone="test_resnet",
        backbone_kwargs={},
        image_size=224,
        k=0.1,
        pool=8,
        train_size=2000,
        finetune_size=500,
        val_size=500,
        val_fraction=0.1,
        augment=False,
        batch_size=32,
        num_workers=0,
        pretrain_epochs=6,
        pretrain_lr=0.05,
        finetune_epochs=2,
        finetune_lr=0.01,
        methods=("vanilla", "r2et"),
        defaults={"r2et": 0.1},
        sweep_eval_size=0,
        eval=EvalConfig(
            size=50,
            batch_size=25,
            attack_steps=20,
            relu_surrogate=("er",),
            eps_list=(2 / 255, 8 / 255),
            eps_curve_steps=5,
            eps_curve_size=25,
            steps_curve=(5, 10, 20),
            steps_curve_size=25,
            thickness_size=50,
            thickness_samples=2,
            thickness_points=2,
            explainer_size=0,
            pse_size=30,
            pse_steps=10,
            pse_group_size=32,
            test_acc_size=1000,
        ),
    )


def _full_cifar() -> TaskConfig:
    return TaskConfig(
        grids={
            "wd": [5e-4, 5e-3, 5e-2],
            "sp": [2.0, 5.0, 10.0],
            "est_h": [0.03, 0.1, 0.3, 1.0],
            "grad_norm": [0.03, 0.1, 0.3, 1.0],
            "r2et_noh": [0.03, 0.1, 0.3, 1.0],
            "r2et": [0.03, 0.1, 0.3, 1.0],
            "r2et_mm": [0.03, 0.1, 0.3, 1.0],
            "at": [2 / 255, 4 / 255, 8 / 255],
        },
        eval=EvalConfig(),
    )


def _full_imagenette() -> TaskConfig:
    return TaskConfig(
        dataset="imagenette",
        backbone="resnet18",
        backbone_kwargs={},
        image_size=224,
        k=0.1,
        pool=8,
        train_size=9469,
        val_size=947,
        batch_size=64,
        num_workers=8,
        pretrain_epochs=40,
        pretrain_lr=0.1,
        finetune_epochs=5,
        finetune_lr=0.01,
        methods=("vanilla", "r2et"),
        grids={"r2et": [0.03, 0.1, 0.3, 1.0]},
        sweep_eval_size=100,
        sweep_attack_steps=10,
        eval=EvalConfig(
            size=500, batch_size=50, attack_steps=100, relu_surrogate=("er",),
            eps_curve_size=200, steps_curve_size=200, explainer_size=100, explainer_steps=20,
            pse_size=200, pse_group_size=32, test_acc_size=3925,
        ),
    )


def _smoke_cifar() -> TaskConfig:
    return TaskConfig(
        backbone_kwargs={"width": 8},
        train_size=400,
        finetune_size=200,
        val_size=100,
        batch_size=50,
        num_workers=0,
        pretrain_epochs=1,
        finetune_epochs=1,
        grids={"r2et": [0.1, 1.0], "wd": [5e-3, 5e-2]},
        defaults={"sp": 5.0, "est_h": 0.1, "grad_norm": 0.1, "at": 8 / 255},
        inherit={"r2et_noh": "r2et", "r2et_mm": "r2et"},
        at_steps=2,
        sweep_eval_size=10,
        sweep_attack_steps=3,
        eval=EvalConfig(
            size=20, batch_size=20, attack_steps=5, relu_surrogate=("er",),
            eps_list=(2 / 255, 8 / 255), eps_curve_steps=3, eps_curve_size=10,
            steps_curve=(2, 5), steps_curve_size=10, thickness_size=10, thickness_samples=2,
            thickness_points=2, explainer_size=6, explainer_steps=2, smoothgrad_samples=2,
            ig_steps=2, pse_size=10, pse_steps=3, pse_group_size=8, test_acc_size=100,
        ),
    )


def _smoke_imagenette() -> TaskConfig:
    return TaskConfig(
        dataset="imagenette",
        backbone="test_resnet",
        backbone_kwargs={},
        image_size=64,
        k=0.1,
        pool=8,
        train_size=100,
        val_size=20,
        augment=False,
        batch_size=25,
        num_workers=0,
        pretrain_epochs=1,
        finetune_epochs=1,
        methods=("vanilla", "r2et"),
        defaults={"r2et": 0.1},
        sweep_eval_size=0,
        eval=EvalConfig(
            size=10, batch_size=10, attack_steps=3, relu_surrogate=(), eps_list=(8 / 255,),
            eps_curve_steps=2, eps_curve_size=10, steps_curve=(1, 3), steps_curve_size=10,
            thickness_size=10, thickness_samples=1, thickness_points=2, explainer_size=0,
            pse_size=6, pse_steps=2, pse_group_size=16, test_acc_size=20,
        ),
    )


def build_preset(name: str) -> Preset:
    """A fresh preset object by name (``smoke``, ``cpu``, ``full``)."""
    if name == "smoke":
        return Preset(
            "smoke",
            "pipeline check only: tiny model, data and attacks (numbers are not meaningful)",
            _smoke_cifar(), _smoke_imagenette(), accelerator="cpu",
        )
    if name == "cpu":
        return Preset(
            "cpu",
            "about 40-45 minutes on 2 idle CPU cores with 2 torch threads: ResNet-9 width 16 on a 20k-image CIFAR-10 subset, "
            "2-epoch fine-tunes on 5k images, 100-image evaluation subset with 100-step attacks; Imagenette "
            "at 224 px with timm's test_resnet (0.4M parameters) pretrained on 2k images, 20-step attacks",
            _cpu_cifar(), _cpu_imagenette(), accelerator="cpu",
        )
    if name == "full":
        return Preset(
            "full",
            "one GPU: ResNet-9 width 64 on all of CIFAR-10 (45k train / 5k val), 500-image "
            "evaluation subset, 100-step attacks; Imagenette with ResNet-18 at 224 px",
            _full_cifar(), _full_imagenette(), accelerator="auto",
        )
    raise ValueError(f"preset={name!r} is not known; valid: smoke, cpu, full")


PRESETS = ("smoke", "cpu", "full")


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


def to_dict(preset: Preset) -> dict[str, Any]:
    """The preset as plain JSON-able data."""
    return dataclasses.asdict(preset)
