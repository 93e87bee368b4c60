"""Clean accuracy of a published CIFAR ResNet before and after a short fine-tune on JPEG CIFAR-10.

    python -m benchmarks.cifar_resnet_accuracy --weights_file /path/to/resnet20-12fca82f.th \\
        --data /path/to/cifar10_jpg --epochs 1 --lr 0.01

``--data`` holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (class folders in CIFAR-10's
order, alphabetical). The model is ``build_backbone(arch, weights_file=...)`` (the published file's
keys mapped by ``checkpoint_filter_fn``, ImageNet normalization as in the original training). The
fine-tune is SGD (momentum 0.9, weight decay 5e-4, batch 128) with the standard CIFAR augmentation
(4-pixel padded random crop, horizontal flip), constant learning rate. Prints one JSON line with
the accuracies. Nothing is saved unless ``--save`` is given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_modules.backbones import build_backbone


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of ``root/split`` as uint8 (N, 3, 32, 32) and labels (N,), classes sorted."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / split / name).glob("*.jpg")):
            with Image.open(file) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i : i + batch].float() / 255).argmax(1) == y[i : i + batch]).sum().item()
    return correct / len(x)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batched 4-px padded random crop + horizontal flip of uint8 (B, 3, 32, 32) -> float [0, 1]."""
    b, _, h, w = x.shape
    padded = F.pad(x.float() / 255, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator)
    dx = torch.randint(0, 9, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, 3, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, 3, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--weights_file", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", default=None, help="write the fine-tuned state dict here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = Path(args.data)
    t0 = time.time()
    x_test, y_test = load_split(root, "test")
    x_train, y_train = load_split(root, "train")
    load_s = time.time() - t0
    model = build_backbone(args.arch, weights_file=args.weights_file)
    before = accuracy(model, x_test, y_test)
    train_before = accuracy(model, x_train[:10000], y_train[:10000])
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)
    steps = int(args.epochs * len(x_train) / args.batch_size)
    perm = torch.cat([torch.randperm(len(x_train), generator=gen) for _ in range(int(np.ceil(args.epochs)))])
    t1 = time.time()
    model.train()
    for step in range(steps):
        idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
        loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.time() - t1
    after = accuracy(model, x_test, y_test)
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(json.dumps({
        "arch": args.arch, "test_images": len(x_test), "train_images": len(x_train),
        "test_acc_before": before, "train10k_acc_before": train_before, "test_acc_after": after,
        "epochs": args.epochs, "steps": steps, "lr": args.lr, "batch_size": args.batch_size,
        "seed": args.seed, "load_s": round(load_s, 1), "train_s": round(train_s, 1),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
