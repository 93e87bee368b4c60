"""Helpers for multi-process tests: free loopback ports, a cluster-style launch, test callbacks.

- :func:`free_port`: a TCP port on 127.0.0.1 that is free now (bound to port 0, then closed).
- :func:`torchrun_nodes`: start ``nodes`` torchrun agents on this machine, each acting as one node
  (``--nnodes N --node_rank i --nproc_per_node P``, static rendezvous on 127.0.0.1), running
  ``train.py`` with the given arguments; returns the finished processes' outputs.
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
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


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
