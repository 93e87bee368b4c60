"""Presets of the reproduction study: what is trained, how long, and how it is evaluated.

Four presets (``smoke``, ``cpu``, ``cpu_small``, ``gpu``) are plain dataclasses, so every number
behind docs/results.md is in this committed file; ``--set key=value`` on the command line overrides
a field for experiments (the override is recorded in the results JSON and the report).

- ``cpu``: the published CIFAR ResNet-20 (``--weights-file``), adapted to the JPEG images by one
  vanilla epoch, then every method fine-tuned from it; 3 training seeds for SP, Est-H and R2ET.
- ``cpu_small``: the earlier CPU setting (ResNet-9 width 16 trained from scratch on 20k images).
- ``gpu``: paper scale (ResNet-9 width 64 on the full training split, 3 seeds per method, 1000
  evaluation images). ``smoke``: a pipeline check with chance-level numbers.

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
  floor check of its own.
- AT trains against the R2ET reference code's attack strength (``PAPER_AT``: one l2 step).
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

    Main block (every evaluated model): ``size`` images, the evaluation protocol's default ensemble
    (ER, ER through a Softplus surrogate for ReLU-type models, MSE, uniform noise) at every budget
    of ``eps_list`` with ``steps`` steps each (APGD step-size schedule), the per-image worst case,
    boundary and all-pairs thickness at ``eps`` (``thickness_samples`` x ``thickness_points``), and
    clean accuracy on ``test_acc_size`` test images (forward passes only).
    Extras (the seed-0 model of each method): ``check_size`` images attacked with ``check_steps``
    steps at ``eps`` (does ``steps`` leave robustness on the table?); the paper-protocol attack
    (``explanations.attacks.PaperERAttack``: ``paper_steps`` l2 steps of ``paper_step_size`` in
    normalised units, first flip) on ``paper_size`` images; ER on SmoothGrad / IG explanations on
    ``explainer_size`` images; PSE (targeted PGD, C&W margin, random target) on ``pse_size``.
    ``eps`` is the headline budget of the paired comparisons. ``relu_surrogate`` /
    ``surrogate_beta``: the validation sweep's ER (DESIGN §5) on ReLU models.
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
    check_size: int = 100
    check_steps: int = 100
    paper_size: int = 200
    paper_steps: int = 100
    paper_step_size: float = 5e-3
    explainer_size: int = 200
    explainer_steps: int = 20
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
    """One data set: model, training budget, sweep, seeds and evaluation.

    ``pretrained``: the first stage adapts published weights (``--weights-file``) with a vanilla
    fine-tune of ``pretrain_epochs`` on ``train_size`` images instead of training from scratch.
    ``seed_methods`` / ``seeds``: these methods' selected settings are fine-tuned ``seeds`` times
    (training seeds 0 .. seeds-1 on the same images) and every seed is evaluated, for the paired
    comparisons; other methods have seed 0 only. ``at_kwargs``: AT's training attack.
    ``val_sweep``: variants fine-tuned after the main study and scored on the validation split only
    (never on test images), to find out why R2ET does or does not beat its controls: each is
    ``{name, method, set}`` with ``set`` keys ``weight`` (a number or ``selected``), ``softplus_beta``,
    ``k``, ``pair_set``, ``epochs``.
    """

    dataset: str = "cifar10"  # cifar10 | imagenette
    backbone: str = "resnet9"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 64})
    pretrained: bool = False
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
    at_kwargs: dict[str, Any] = field(default_factory=dict)
    seed_methods: tuple[str, ...] = ()
    seeds: int = 1
    val_sweep: tuple[dict[str, Any], ...] = ()
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


#: AT at the strength of the R2ET reference code (ccha005/R2ET ``batch_retrain.retrain``, mode
#: ``at``): one ranking-attack step of l2 length 1 in normalised units per training image, then CE
#: on the attacked image. In pixel units (the model normalises inside) one normalised unit is one
#: std, 0.226 on average for the ImageNet statistics of the CIFAR ResNets; the box of the
#: reference (1 unit) never binds after one step of that length.
PAPER_AT = {"steps": 1, "step": "l2", "step_size": 0.226, "eps": 0.226}


#: The cpu preset's validation-only sweep (TaskConfig.val_sweep): k of R2ET's gap term, its pair
#: set, the Softplus beta and the number of epochs, with the SP control where one exists (the
#: weight is the main grid's).
CPU_VAL_SWEEP: tuple[dict[str, Any], ...] = (
    {"name": "r2et-k50", "method": "r2et", "set": {"weight": "selected", "k": 50}},
    {"name": "r2et-all_pairs", "method": "r2et", "set": {"weight": "selected", "pair_set": "all"}},
    {"name": "r2et-beta5", "method": "r2et", "set": {"weight": "selected", "softplus_beta": 5.0}},
    {"name": "sp-beta5", "method": "sp", "set": {"softplus_beta": 5.0}},
    {"name": "r2et-w0.2-3ep", "method": "r2et", "set": {"weight": 0.2, "epochs": 3}},
    {"name": "sp-3ep", "method": "sp", "set": {"epochs": 3}},
)


def _cpu_cifar() -> TaskConfig:
    # The published CIFAR ResNet-20 (0.27M parameters). Measured on 2 idle cores, 2 threads:
    # CE fine-tune ~4 ms/image, Est-H / R2ET ~13-15 ms/image, one ER step ~7.3 ms/image.
    return TaskConfig(
        backbone="resnet20",
        backbone_kwargs={},
        pretrained=True,
        softplus_beta=10.0,
        train_size=45000,
        finetune_size=10000,
        val_size=2000,
        batch_size=128,
        num_workers=0,
        pretrain_epochs=1,
        pretrain_lr=0.01,
        finetune_epochs=1,
        finetune_lr=0.01,
        grids={
            "wd": [5e-3, 5e-2],
            "grad_norm": [0.001, 0.01, 0.1],
            "est_h": [0.1, 0.2, 0.5],
            "r2et": [0.1, 0.2, 0.5],
        },
        inherit={"r2et_noh": "r2et", "r2et_mm": "r2et"},
        defaults={"sp": 10.0},
        at_kwargs=dict(PAPER_AT),
        seed_methods=("sp", "est_h", "r2et"),
        seeds=3,
        val_sweep=CPU_VAL_SWEEP,
        sweep_eval_size=100,
        sweep_attack_steps=10,
        eval=EvalConfig(
            size=200, batch_size=100, steps=10, check_size=40, check_steps=100, paper_size=40,
            explainer_size=20, explainer_steps=10, smoothgrad_samples=8, ig_steps=8,
            pse_size=100, pse_steps=10, test_acc_size=10000,
        ),
    )


def _small_eval() -> EvalConfig:
    return EvalConfig(
        size=100, steps=20, thickness_samples=4, check_size=20, check_steps=100, paper_size=50,
        explainer_size=40, explainer_steps=20, smoothgrad_samples=8, ig_steps=8, pse_size=100,
        pse_steps=10, test_acc_size=2000,
    )


def _cpu_small_cifar() -> TaskConfig:
    # The earlier CPU setting: ResNet-9 width 16 pretrained from scratch on 20k images.
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
        eval=_small_eval(),
    )


def _cpu_small_imagenette() -> TaskConfig:
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
            size=50, batch_size=25, steps=10, eps_list=(2 / 255, 8 / 255), thickness_samples=2,
            thickness_points=2, check_size=0, paper_size=0, explainer_size=0, pse_size=30, pse_steps=10,
            pse_group_size=32, test_acc_size=1000,
        ),
    )


def _gpu_cifar() -> TaskConfig:
    # Paper scale: ResNet-9 width 64 trained from scratch on all of CIFAR-10's train split.
    return TaskConfig(
        grids={
            "wd": [5e-4, 5e-3, 5e-2],
            "sp": [2.0, 5.0, 10.0],
            "est_h": [0.03, 0.1, 0.3, 1.0],
            "grad_norm": [0.03, 0.1, 0.3, 1.0],
            "r2et_noh": [0.03, 0.1, 0.3, 1.0],
            "r2et": [0.03, 0.1, 0.3, 1.0],
            "r2et_mm": [0.03, 0.1, 0.3, 1.0],
        },
        at_kwargs={"steps": 1, "step": "l2", "step_size": 0.25, "eps": 0.25},
        seed_methods=tuple(m for m in METHOD_NAMES),
        seeds=3,
        eval=EvalConfig(size=1000, batch_size=250, steps=20, check_size=200, paper_size=1000,
                        explainer_size=200, pse_size=500),
    )


def _gpu_imagenette() -> TaskConfig:
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
        eval=EvalConfig(size=1000, batch_size=50, steps=20, check_size=100, paper_size=0,
                        explainer_size=100, explainer_steps=20, pse_size=200, pse_group_size=32, test_acc_size=3925),
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
        defaults={"sp": 5.0, "est_h": 0.1, "grad_norm": 0.1},
        inherit={"r2et_noh": "r2et", "r2et_mm": "r2et"},
        at_kwargs=dict(PAPER_AT),
        seed_methods=("sp", "r2et"),
        seeds=2,
        sweep_eval_size=10,
        sweep_attack_steps=3,
        eval=EvalConfig(
            size=20, batch_size=20, steps=3, eps_list=(2 / 255, 8 / 255), thickness_samples=2,
            thickness_points=2, check_size=6, check_steps=6, paper_size=6, paper_steps=5,
            explainer_size=6, explainer_steps=2, smoothgrad_samples=2, ig_steps=2, pse_size=10,
            pse_steps=3, pse_group_size=8, test_acc_size=100,
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
            size=10, batch_size=10, steps=3, eps_list=(8 / 255,), thickness_samples=1, thickness_points=2,
            check_size=0, paper_size=0, explainer_size=0, pse_size=6, pse_steps=2, pse_group_size=16,
            test_acc_size=20,
        ),
    )


def build_preset(name: str) -> Preset:
    """A fresh preset object by name (see ``PRESETS``)."""
    if name == "smoke":
        return Preset(
            "smoke",
            "pipeline check only: tiny model, data and attacks (numbers are not meaningful)",
            _smoke_cifar(), _smoke_imagenette(), accelerator="cpu",
        )
    if name == "cpu":
        return Preset(
            "cpu",
            "about 90 minutes on 2 idle CPU cores with 2 torch threads: the published CIFAR ResNet-20 adapted "
            "to the JPEG images (1 epoch on 45k), 1-epoch fine-tunes on 10k images, 3 training seeds for SP, "
            "Est-H and R2ET, 200-image evaluation subset, attack ensemble at 1/2/4/8 /255",
            _cpu_cifar(), None, accelerator="cpu",
        )
    if name == "cpu_small":
        return Preset(
            "cpu_small",
            "about 45 minutes on 2 idle CPU cores: ResNet-9 width 16 pretrained on a 20k-image CIFAR-10 subset, "
            "2-epoch fine-tunes on 5k images, 100-image evaluation subset; Imagenette at 224 px with timm's "
            "test_resnet pretrained on 2k images",
            _cpu_small_cifar(), _cpu_small_imagenette(), accelerator="cpu",
        )
    if name == "gpu":
        return Preset(
            "gpu",
            "one GPU, paper scale: ResNet-9 width 64 on all of CIFAR-10 (45k train / 5k val), 3 training seeds "
            "per method, 1000-image evaluation subset; Imagenette with ResNet-18 at 224 px",
            _gpu_cifar(), _gpu_imagenette(), accelerator="auto",
        )
    raise ValueError(f"preset={name!r} is not known; valid: {', '.join(PRESETS)}")


PRESETS = ("smoke", "cpu", "cpu_small", "gpu")


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
