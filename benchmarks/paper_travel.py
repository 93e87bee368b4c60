"""How far the R2ET reference attack moves an image: pixel l2 and l_inf of x_adv - x.

    python -m benchmarks.paper_travel --weights-file /work/shared/weights/cifar10_resnet20.th \\
        --data-dir /tmp/cifar10_jpg --num-images 40 --threads 2

The attack is ``explanations.attacks.PaperERAttack`` with the reference settings (100 l2 steps of
5e-3 normalised units, box 0.5 normalised units, first flip, no [0, 1] clip, k = 100, CE target),
run on the published CIFAR-10 ResNet-20 (ReLU, as published; the reference attack takes the plain
gradient, no surrogate) and on the same weights with every ReLU swapped for Softplus(beta)
(``--beta``, the activation of the study's regularised models), on the first ``--num-images``
JPEG test images in the study's class-balanced order. Per model: the mean, min and max over the
images of the pixel l2 and l_inf travel (l_inf also in /255), the normalised l2, the share of
images stopped by a flip, and for scale the l2 radius of the pixel l_inf balls of 1, 2, 8 /255
(eps sqrt(d), d = 3072 values per image). Prints a JSON object (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from explanations.attacks import PaperERAttack


def travel(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 20) -> dict:
    """Per-image travel of the reference attack on ``net`` (a model with a ``normalize`` layer)."""
    norm = net.normalize
    std = norm.std.flatten()
    attack = PaperERAttack(net, mean=norm.mean.flatten().tolist(), std=std.tolist(), k=100)
    deltas, flips = [], []
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        deltas.append((attack(xb, yb) - xb).flatten(1))
        flips.append(attack.flipped.float())
    delta = torch.cat(deltas)
    l2, linf = delta.norm(dim=1), delta.abs().amax(dim=1)
    z = delta.view(len(y), len(std), -1) / std.view(1, -1, 1)

    def stats(v: torch.Tensor, scale: float = 1.0) -> dict:
        return {"mean": float(v.mean()) * scale, "min": float(v.min()) * scale, "max": float(v.max()) * scale}

    return {"pixel_l2": stats(l2), "pixel_linf": stats(linf), "pixel_linf_x255": stats(linf, 255.0),
            "normalised_l2": stats(z.flatten(1).norm(dim=1)), "stopped_by_flip": float(torch.cat(flips).mean()),
            "n": len(y)}


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.reproduce.data import labels_of, load_images, study_order
    from datamodules import CIFAR10DataModule
    from lightning_modules.backbones import build_backbone

    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_travel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights-file", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--num-images", type=int, default=40)
    p.add_argument("--beta", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dm = CIFAR10DataModule(data_dir=args.data_dir, val_fraction=0.0, augment=False)
    dm.setup("test")
    images = load_images(dm.test_dataset, study_order(labels_of(dm.test_dataset), args.num_images))
    out: dict = {"command": "python -m benchmarks.paper_travel " + " ".join(argv if argv is not None else []),
                 "l2_radius_of_linf_ball": {f"{e}/255": e / 255 * math.sqrt(3 * 32 * 32) for e in (1, 2, 8)},
                 "models": {}}
    for name, kwargs in (("relu", {}), (f"softplus{args.beta:g}", {"activation": "softplus", "softplus_beta": args.beta})):
        net = build_backbone("resnet20", num_classes=10, weights_file=args.weights_file, **kwargs).eval()
        start = time.perf_counter()
        out["models"][name] = travel(net, images.x, images.y)
        out["models"][name]["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
