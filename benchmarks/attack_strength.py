"""Attack strength: P@k against eps for the legacy first-flip ERAttack, the best-iterate attacks of
the evaluation protocol, each ensemble member, the per-image worst case and uniform noise.

    python -m benchmarks.attack_strength --out docs/benchmarks/attack_strength.json \\
        --cifar-weights /work/shared/weights/cifar10_resnet20.th --data-dir /tmp/cifar10_jpg

Models:
- ``default``: the built-in default run (configs/default.yaml: R2ET, Softplus ResNet-9 on the
  synthetic data), trained here through the CLI for its 3 epochs (``--default-ckpt`` loads one
  instead); evaluated on the synthetic validation set.
- ``cifar10_resnet20``: a ReLU CIFAR-10 ResNet-20 written with ``F.relu`` (He et al. 2016, option-A
  shortcuts), with the weights of ``--cifar-weights`` (akamaster format, ``module.`` keys) or
  ``--cifar-ckpt`` (a RobustClassifier checkpoint); evaluated on the JPEG CIFAR-10 test images of
  ``--data-dir``. Skipped, with a line saying so, when neither is given.

Each model: a class-balanced seeded subset of ``--num-images`` images (``callbacks._eval_subset``),
k = ``--k``, target ``loss``, gradient saliency, ``--steps`` steps at each eps. JSON:
``{model: {attack: {"1/255": P@k, ...}}, "seconds": {model: {attack: s}}, "facts": {model: {...}},
"settings": {model: {...}}}`` (``--update`` keeps the models of an existing file, so the models can
be measured in separate runs)
(seconds: wall time of each attack over all eps, including the saliency of its output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from callbacks._eval_subset import EvalSubset
from explanations.evaluation import DEFAULT_EPS, EvaluationProtocol, eps_label, eps_tag

ROOT = Path(__file__).resolve().parents[1]
LEGACY = {"name": "legacy_er", "attack": "er", "kwargs": {"legacy": True, "surrogate_beta": None}}


def load_resnet20(path: str) -> nn.Module:
    """The CIFAR-10 ResNet-20 of ``lightning_modules.cifar_resnet`` (F.relu calls) with the published
    akamaster weights at ``path``, normalization included, in eval mode."""
    from lightning_modules.backbones import build_backbone

    return build_backbone("resnet20", num_classes=10, weights_file=path).eval()


# ------------------------------------------------------------------ models and data
def default_model(ckpt: str | None, log) -> tuple[nn.Module, object]:
    """The default run's model (trained here, or from ``ckpt``) and its validation set."""
    from lightning_modules.cli import main
    from lightning_modules.classifier import RobustClassifier

    if ckpt is None:
        root = tempfile.mkdtemp(prefix="attack_strength_")
        log(f"training the default model (configs/default.yaml, 3 epochs) in {root}")
        start = time.perf_counter()
        cli = main(["fit", "-c", str(ROOT / "configs/default.yaml"), "--trainer.logger=false",
                    "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"])
        log(f"  trained in {time.perf_counter() - start:.0f} s")
        module, dm = cli.model, cli.datamodule
    else:
        from datamodules import SyntheticDataModule

        module = RobustClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        dm = SyntheticDataModule(num_classes=10, image_size=32, train_size=2000, val_size=500, test_size=500)
    dm.setup("validate")
    return module.model.eval(), dm.val_dataset


def cifar_data(data_dir: str):
    from torchvision import datasets, transforms

    folder = Path(data_dir) / "test"
    if not folder.is_dir():
        raise SystemExit(f"error: --data-dir {data_dir}: no test/<class>/*.jpg folder at {folder}")
    return datasets.ImageFolder(str(folder), transform=transforms.ToTensor())


# ------------------------------------------------------------------ the measurement
def measure(model: nn.Module, dataset, args, log) -> tuple[dict, dict, dict]:
    """P@k tables {attack: {eps: P@k}}, seconds {attack: s} and extra facts of one model."""
    subset = EvalSubset(dataset, args.num_images, seed=args.seed, batch_size=args.batch_size)
    batches = list(subset)
    common = dict(eps=list(DEFAULT_EPS), k=args.k, steps=args.steps, seed=args.seed, thickness=False,
                  correlations=False, localization=False)
    protocol = EvaluationProtocol(**common)  # the default ensemble
    legacy = EvaluationProtocol(attacks=[LEGACY], noise=False, **common)
    tables, seconds = {}, {}
    for proto in (legacy, protocol):
        start = time.perf_counter()
        result = proto.evaluate(model, batches)
        means = result.means()
        names = [s.name for s in proto.prepare(model, batches[0].x[:1])[0]]
        log(f"  {', '.join(names)}: {time.perf_counter() - start:.0f} s; notes: {result.notes or 'none'}")
        for name in names + ([] if proto is legacy else ["worst"]):
            tables[name] = {eps_label(e): means[f"p_at_k/{name}/gradient/{eps_tag(e)}"] for e in proto.eps}
        seconds.update({n: round(s, 2) for n, s in result.seconds.items()})
        accuracy = means["accuracy"]
    return tables, seconds, {"accuracy": accuracy, "num_images": result.num_images}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="attack_strength.json", help="JSON output path (a Markdown table is printed)")
    parser.add_argument("--default-ckpt", help="RobustClassifier checkpoint of the default run (default: train it here)")
    parser.add_argument("--skip-default", action="store_true", help="do not measure the default model")
    parser.add_argument("--cifar-weights", help="CIFAR-10 ResNet-20 weights (akamaster format) for the CIFAR model")
    parser.add_argument("--data-dir", default="/tmp/cifar10_jpg", help="JPEG CIFAR-10 root with test/<class>/*.jpg")
    parser.add_argument("--num-images", type=int, default=64, help="class-balanced evaluation images per model")
    parser.add_argument("--batch-size", type=int, default=32, help="images per attack batch")
    parser.add_argument("--steps", type=int, default=20, help="attack steps at each eps")
    parser.add_argument("--k", type=int, default=100, help="top-k size")
    parser.add_argument("--seed", type=int, default=0, help="subset and attack seed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--update", action="store_true",
                        help="keep the other models already in --out (measure models in separate runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {"seconds": {}, "facts": {}, "settings": {}}
    if args.update and Path(args.out).is_file():
        out = json.loads(Path(args.out).read_text())
    models = []
    if not args.skip_default:
        models.append(("default", lambda: default_model(args.default_ckpt, log)))
    if args.cifar_weights:
        models.append(("cifar10_resnet20", lambda: (load_resnet20(args.cifar_weights), cifar_data(args.data_dir))))
    else:
        log("cifar10_resnet20 skipped: give --cifar-weights (a CIFAR-10 ResNet-20 state dict)")
    for name, build in models:
        log(f"== {name}")
        model, dataset = build()
        tables, seconds, extra = measure(model, dataset, args, log)
        out[name], out["seconds"][name], out["facts"][name] = tables, seconds, extra
        out["settings"][name] = dict(
            eps=[eps_label(e) for e in DEFAULT_EPS], k=args.k, steps=args.steps, num_images=args.num_images,
            seed=args.seed, target="loss", method="gradient", threads=torch.get_num_threads(), torch=torch.__version__,
            machine=platform.processor() or platform.machine(), load_avg=[round(v, 1) for v in os.getloadavg()],
            command="python -m benchmarks.attack_strength " + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    """The P@k table (one row per model and attack) and the seconds per attack."""
    eps = [eps_label(e) for e in DEFAULT_EPS]
    lines = ["| model | attack | " + " | ".join(f"P@k {e}" for e in eps) + " | seconds |",
             "|---|---|" + "---|" * (len(eps) + 1)]
    for model, secs in out["seconds"].items():
        for attack, row in out[model].items():
            sec = secs.get(attack)
            lines.append(f"| {model} | {attack} | " + " | ".join(f"{row[e]:.3f}" for e in eps)
                         + f" | {'' if sec is None else f'{sec:.0f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
