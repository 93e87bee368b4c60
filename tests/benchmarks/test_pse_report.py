"""benchmarks/pse_report.py: flags made from PSESettings (docs, types, choices, defaults), the
config's PSE settings as the defaults, flags win."""

import dataclasses
import typing
from typing import Literal

import pytest

from benchmarks import pse_report as report
from explanations.pse import PSESettings


def _option(p, dest: str):
    return next(a for a in p._actions if a.dest == dest)


def test_every_setting_is_a_described_flag_with_its_choices_and_default():
    p = report.parser()
    assert [a.dest for a in p._actions if a.dest != "help" and not a.help] == []
    docs = report.field_docs(PSESettings)
    hints = typing.get_type_hints(PSESettings)
    for field in dataclasses.fields(PSESettings):
        option = _option(p, field.name)
        assert option.option_strings == ["--" + field.name.replace("_", "-")]
        assert option.help.startswith(docs[field.name]) and option.default == field.default
        if typing.get_origin(hints[field.name]) is Literal:
            assert option.choices == list(typing.get_args(hints[field.name]))
    args = p.parse_args(["--ckpt", "x", "--out", "y", "--cutoffs", "0.25", "0.75", "--step-size", "null",
                         "--cam-layer", "backbone.layer4", "--rand-init", "true", "--steps", "7"])
    assert (args.cutoffs, args.step_size, args.cam_layer, args.rand_init, args.steps) == (
        [0.25, 0.75], None, "backbone.layer4", True, 7)


def test_a_new_field_gets_a_flag_and_an_undocumented_one_is_refused():
    import argparse

    @dataclasses.dataclass(frozen=True)
    class Settings:
        """Settings of a new analysis.

        Args:
            mode: how to sort
            size: pixels per side
        """

        mode: Literal["a", "b"] = "a"
        size: int | None = None

    p = argparse.ArgumentParser()
    report.add_settings_flags(p, Settings)
    assert p.parse_args(["--mode", "b", "--size", "4"]) == argparse.Namespace(mode="b", size=4)
    assert _option(p, "mode").choices == ["a", "b"] and _option(p, "size").help.startswith("pixels per side")

    @dataclasses.dataclass(frozen=True)
    class Undocumented:
        """Settings with a field left out of the Args.

        Args:
            mode: how to sort
        """

        mode: str = "a"
        size: int = 1

    with pytest.raises(ValueError, match=r"Undocumented\.size has no entry in the class docstring's Args: section"):
        report.add_settings_flags(argparse.ArgumentParser(), Undocumented)


def test_the_budget_comes_from_the_config_and_a_flag_wins(tmp_path, monkeypatch, plain_argv):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  class_path: datamodules.SyntheticDataModule\n  init_args: {image_size: 16}\n"
                   "trainer:\n  callbacks:\n    - class_path: callbacks.PSEAnalysis\n"
                   "      init_args: {num_samples: 3, settings: {eps: 0.2, steps: 7}}\n")
    seen = {}

    def analyze(ckpt, out, datamodule, **kwargs):
        seen.update(kwargs, datamodule=datamodule)
        return {"num_analysed": 1.0, "attack_success_rate": 1.0, "num_failed": 0.0, "num_success": 1.0,
                **{f"frac_{c}": 0.25 for c in ("suppression", "balanced", "promotion", "ineffective")}}

    monkeypatch.setattr(report, "analyze_checkpoint", analyze)
    report.main(["--ckpt", "x", "--out", str(tmp_path / "o"), "-c", str(cfg), "--eps", "0.05", "--num-samples", "5"])
    assert type(seen["datamodule"]).__name__ == "SyntheticDataModule" and seen["datamodule"].hparams.image_size == 16
    assert seen["settings"] == PSESettings(eps=0.05, steps=7)  # the flag wins, the config gives the rest
    assert seen["num_samples"] == 5
