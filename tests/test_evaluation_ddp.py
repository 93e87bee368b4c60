"""2-process CPU DDP: RankingRobustness logs exactly what one process and the protocol compute."""

import pytest
import torch

from callbacks._eval_subset import EvalSubset
from explanations.evaluation import EvaluationProtocol
from tests.callbacks.test_ranking_robustness import TinyDataModule, TinyModule, callback, trainer


def _cb():
    return callback(num_samples=11, batch_size=3, attack_kwargs={"random_start": True}, eps=[2 / 255, 8 / 255],
                    methods=["gradient", "smoothgrad"], method_kwargs={"smoothgrad": {"num_samples": 2}})


def test_two_process_ddp_equals_single_process_and_the_protocol(tmp_path, one_thread):
    single_cb = _cb()
    single = trainer(tmp_path / "one", single_cb, precision="64-true")
    single.validate(TinyModule(), datamodule=TinyDataModule(val_size=20), verbose=False)
    want = {k: float(v) for k, v in single.callback_metrics.items() if k.startswith("robustness/")}
    assert len(want) > 80

    ddp = trainer(tmp_path / "two", _cb(), precision="64-true", devices=2, strategy="ddp_spawn")
    ddp.validate(TinyModule(), datamodule=TinyDataModule(val_size=20), verbose=False)
    got = {k: float(v) for k, v in ddp.callback_metrics.items() if k.startswith("robustness/")}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-6), name

    dm = TinyDataModule(val_size=20)
    dm.setup()
    protocol = EvaluationProtocol(eps=[2 / 255, 8 / 255], attacks=["er", "mse"], k=10, steps=2,
                                  methods=["gradient", "smoothgrad"], method_kwargs={"smoothgrad": {"num_samples": 2}},
                                  attack_kwargs={"random_start": True}, thickness_samples=1, thickness_points=2)
    subset = EvalSubset(dm.val_dataset, 11, seed=0, batch_size=3)
    direct = protocol.evaluate(TinyModule().model.double(), [b.to("cpu", torch.float64) for b in subset]).means()
    for key, value in direct.items():
        assert single_cb.last_values["robustness/" + key] == value, key
        assert got["robustness/" + key] == pytest.approx(value, abs=1e-6), key
