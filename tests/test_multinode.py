"""Two "nodes" of two CPU processes each (world size 4, gloo, 127.0.0.1), launched as a cluster
launches them (one ``torchrun --nnodes 2 --node_rank i --nproc_per_node 2`` per node), train what
one process trains on the same global batch, and checkpoints move between world sizes.

All runs go through ``train.py fit -c <config>`` with the evaluation callbacks on
(``callbacks.RankingRobustness``, ``callbacks.PSEAnalysis``, configured by class_path/init_args). The
model is a BatchNorm-free tiny ResNet-9 (``tests.distributed.helpers.StripBatchNorm``: per-rank
BatchNorm statistics would differ) trained with R2ET (adaptive weights: cross-rank statistics) on
32 synthetic 16 px images, global batch 8 (batch_size 8 / world size), 4 steps, a checkpoint every
2 steps. The shuffled order is the project's SeededRandomSampler (global order from (seed, epoch)),
so every world size sees the same global batches.

The resume runs start from the step-2 (mid-epoch) checkpoint, as a run killed after step 2 would
(tests/test_resume.py kills one with SIGKILL), on another world size, and must end where the
uninterrupted run ends.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from tests.distributed.helpers import GLOBAL_BATCH, STEPS, r2et_config, torchrun_nodes, train_py, wait_all

pytestmark = pytest.mark.slow

TIMEOUT = 420


def launch(tmp: Path, world: int, name: str, ckpt: Path | None = None, batch_size: int | None = None) -> Path:
    """Run train.py fit on ``world`` processes in ``tmp/name``; returns that folder."""
    run_dir = tmp / name
    run_dir.mkdir()
    args = ["fit", "-c", str(r2et_config(tmp, world, name, batch_size))]
    if ckpt is not None:
        args += ["--ckpt_path", str(ckpt)]
    # world 4: two torchrun agents (nodes); world 2: Lightning's own launcher starts the second process
    procs = torchrun_nodes(args, run_dir) if world == 4 else [train_py(args, run_dir)]
    results = wait_all(procs, TIMEOUT)
    for code, out in results:
        assert code == 0, out[-4000:]
    (run_dir / "output.txt").write_text("\n".join(out for _, out in results))
    return run_dir


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("logs/**/*.ckpt"))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (final,) = [p for p in checkpoints(run_dir) if f"step={STEPS}" in p.name]
    return torch.load(final, map_location="cpu", weights_only=True)["state_dict"]


def metric_rows(run_dir: Path) -> list[tuple[int, str, float]]:
    (path,) = list(run_dir.glob("logs/**/metrics.csv"))
    rows = []
    for row in csv.DictReader(path.open()):
        for key, value in row.items():
            if value not in ("", None) and key not in ("epoch", "step"):
                rows.append((int(row["step"]), key, float(value)))
    return rows


def assert_rows_close(got, want, keys=None):
    got = [r for r in got if keys is None or r[1] in keys]
    want = [r for r in want if keys is None or r[1] in keys]
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    for (step, key, a), (_, _, b) in zip(got, want):
        same = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(a) and math.isnan(b))
        assert same, f"step {step} {key}: {a} vs {b}"


def assert_weights_close(got, want):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    return {"single": launch(tmp, 1, "single"), "nodes": launch(tmp, 4, "nodes"), "tmp": tmp}


def test_two_nodes_of_two_processes_match_one_process(runs):
    single, nodes = runs["single"], runs["nodes"]
    out = (nodes / "output.txt").read_text()
    assert "GLOBAL_RANK: 3" in out and "MEMBER: 4/4" in out  # really 4 ranks over 2 torchrun agents
    assert_weights_close(final_weights(nodes), final_weights(single))
    rows_single, rows_nodes = metric_rows(single), metric_rows(nodes)
    keys = {k for _, k, _ in rows_single}
    assert {"train/loss_step", "train/gap_step", "train/lambda_gap_step", "val/acc", "pse/attack_success_rate"} <= keys
    assert any(k.startswith("robustness/p_at_k/") for k in keys)
    assert len([r for r in rows_single if r[1] == "train/loss_step"]) == STEPS
    assert_rows_close(rows_nodes, rows_single)  # same rows, same values: nothing logged twice


def test_two_nodes_log_and_checkpoint_from_rank_zero_only(runs):
    nodes = runs["nodes"]
    assert len(list(nodes.glob("logs/**/metrics.csv"))) == 1
    rows = metric_rows(nodes)
    assert len(rows) == len(set((s, k) for s, k, _ in rows))  # no (step, metric) twice
    assert len(list(nodes.glob("logs/wandb/offline-run-*"))) == 1  # one W&B run
    assert [p.name for p in checkpoints(nodes)] == ["epoch=0-step=2.ckpt", f"epoch=0-step={STEPS}.ckpt"]
    assert [p.name for p in checkpoints(runs["single"])] == [p.name for p in checkpoints(nodes)]


@pytest.mark.parametrize(("source", "world"), [("nodes", 1), ("nodes", 2), ("single", 4)])
def test_mid_epoch_checkpoint_resumes_on_another_world_size(runs, source, world):
    """Same global batch: the data order continues exactly, so the run ends where the uninterrupted one does."""
    (ckpt,) = [p for p in checkpoints(runs[source]) if p.name == "epoch=0-step=2.ckpt"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["samples"] == 2 * GLOBAL_BATCH and loader_state["world_size"] == (4 if source == "nodes" else 1)
    resumed = launch(runs["tmp"], world, f"from_{source}_on_{world}", ckpt=ckpt)
    out = (resumed / "output.txt").read_text()
    assert "same global batch, the data order continues exactly at global sample 16" in out
    assert_weights_close(final_weights(resumed), final_weights(runs["single"]))
    after = {"train/loss_step", "train/gap_step", "val/acc", "val/loss"}
    want = [r for r in metric_rows(runs["single"]) if r[0] >= 2]
    assert {k for _, k, _ in want} >= after
    assert_rows_close(metric_rows(resumed), want, keys=after)


def test_resume_with_another_global_batch_warns(runs):
    (ckpt,) = [p for p in checkpoints(runs["nodes"]) if p.name == "epoch=0-step=2.ckpt"]
    resumed = launch(runs["tmp"], 1, "other_batch", ckpt=ckpt, batch_size=6)
    out = (resumed / "output.txt").read_text()
    assert "global batch batch_size 6 x 1 processes = 6 but the checkpoint was written with batch_size 2 x 4 " \
           "processes = 8; the epoch continues at global sample 12 of the same order (4 samples" in " ".join(out.split())


def test_a_failure_in_one_rank_ends_a_two_node_run_with_its_message(tmp_path):
    """Rank 1 (node 0) raises at step 1: both torchrun agents exit non-zero, promptly, with the message."""
    import time

    from tests.distributed.helpers import FailOnRank, child_env  # noqa: F401  (the callback the config names)

    extra = ({"class_path": "tests.distributed.helpers.FailOnRank", "init_args": {"step": 1}},)
    config = r2et_config(tmp_path, 4, "fail", evaluation=False, extra_callbacks=extra)
    start = time.monotonic()
    results = wait_all(torchrun_nodes(["fit", "-c", str(config)], tmp_path, env=child_env(FAIL_ON_RANK="1")), timeout=240)
    took = time.monotonic() - start
    assert all(code != 0 for code, _ in results), [out[-2000:] for _, out in results]
    assert "injected failure in global rank 1 at step 1" in results[0][1]
    assert took < 240
