"""Helpers for multi-process tests: free loopback ports, a cluster-style launch, test callbacks.

- :func:`free_port`: a TCP port on 127.0.0.1 that is free now (bound to port 0, then closed).
- :func:`torchrun_nodes`: start ``nodes`` torchrun agents on this machine, each acting as one node
  (``--nnodes N --node_rank i --nproc_per_node P``, static rendezvous on 127.0.0.1), running
  ``train.py`` with the given arguments; returns the finished processes' outputs.
- :func:`r2et_config`: the tiny R2ET run config of tests/test_multinode.py and tests/test_ddp.py.
- :class:`StripBatchNorm`: replaces every BatchNorm by Identity at ``setup`` (before DDP wraps the
  model): per-rank batch statistics would differ from the global ones, so runs of different world
  sizes could not be compared.
- :class:`FailOnRank`: raises ``RuntimeError`` in the global rank named by the environment
  variable ``FAIL_ON_RANK`` at training step ``step`` (the other ranks carry on into the next
  collective), for the "one failing rank ends the run" test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH, STEPS = 8, 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PL_", "TORCHELASTIC_"))}
    env.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    env.update(extra)
    return env


def train_py(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env or child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun_nodes(args: list[str], cwd: Path, nodes: int = 2, per_node: int = 2,
                   env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """One torchrun agent per "node", all on 127.0.0.1 (what a cluster runs on each host)."""
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    return [
        subprocess.Popen(
            [*torchrun, f"--nnodes={nodes}", f"--node_rank={i}", f"--nproc_per_node={per_node}",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "train.py"), *args],
            cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(nodes)
    ]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(returncode, output) of each process; kills everything still running after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def r2et_config(tmp: Path, world: int, name: str, batch_size: int | None = None, nodes: int | None = None,
                evaluation: bool = True, extra_callbacks: tuple[dict, ...] = ()) -> Path:
    """``tmp/name.yaml``: tiny BatchNorm-free R2ET run on ``world`` processes (``nodes`` nodes,
    default 2 for world 4), global batch GLOBAL_BATCH, STEPS steps, a checkpoint every 2 steps,
    CSV + offline W&B loggers and, with ``evaluation``, RankingRobustness and PSEAnalysis."""
    callbacks = [
        {"class_path": "tests.distributed.helpers.StripBatchNorm"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "save_last": False}},
        {"class_path": "callbacks.RankingRobustness",
         "init_args": {"num_samples": 8, "batch_size": 4, "log_images": False,
                       "protocol": {"steps": 2, "attacks": ["er"], "thickness": False, "localization": False,
                                    "noise": True}}},
        {"class_path": "callbacks.PSEAnalysis",
         "init_args": {"num_samples": 8, "batch_size": 4, "steps": 2, "only_correct": False, "group_size": 8,
                       "log_table": False, "log_chart": False}},
    ][: None if evaluation else 2] + list(extra_callbacks)
    nodes = nodes or (2 if world == 4 else 1)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": world // nodes, "num_nodes": nodes,
            "strategy": "ddp" if world > 1 else "auto", "max_epochs": 1, "inference_mode": False,
            "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": [
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs", "name": "csv"}},
                {"class_path": "lightning_modules.loggers.RobustWandbLogger",
                 "init_args": {"project": "multinode-test", "save_dir": "logs"}},
            ],
            "callbacks": callbacks,
        },
        "model": {
            "backbone": "resnet9", "backbone_kwargs": {"width": 4}, "num_classes": 3,
            "activation": "softplus", "softplus_beta": 2.0, "objective": "r2et", "k": 16, "adaptive": True,
            "weight": 0.1, "h": 1e-2,  # h = 1e-2: see tests/test_ddp.py (fp32 summation order / h)
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.02}},
        },
        "data": {
            "class_path": "datamodules.SyntheticDataModule",
            "init_args": {"num_classes": 3, "image_size": 16, "pattern_size": 4, "train_size": GLOBAL_BATCH * STEPS,
                          "val_size": 8, "test_size": 4,
                          "batch_size": batch_size or GLOBAL_BATCH // world},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class StripBatchNorm(L.Callback):
    def setup(self, trainer, pl_module, stage) -> None:
        for parent in list(pl_module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, nn.Identity())


class FailOnRank(L.Callback):
    def __init__(self, step: int = 1) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        wanted = os.environ.get("FAIL_ON_RANK")
        if wanted is not None and trainer.global_rank == int(wanted) and trainer.global_step == self.step:
            raise RuntimeError(f"injected failure in global rank {trainer.global_rank} at step {self.step}")
