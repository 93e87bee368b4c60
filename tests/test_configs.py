"""Every shipped config composes and validates (typos in a YAML key fail here, not in a user's run)."""

from pathlib import Path

import pytest

from lightning_modules.cli import main

ROOT = Path(__file__).resolve().parents[1]
STANDALONE = sorted((ROOT / "configs").glob("default.yaml")) + sorted((ROOT / "configs/experiment").glob("*.yaml"))
PIECES = sorted(p for d in ("data", "model", "trainer") for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # pytest's own arguments are not the CLI's


def print_config(capsys, files):
    args = ["fit"] + [a for f in files for a in ("-c", str(f))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return capsys.readouterr().out


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.stem)
def test_standalone_config_parses(path, capsys):
    out = print_config(capsys, [path])
    assert "inference_mode: false" in out  # gradient callbacks need it


@pytest.mark.parametrize("path", PIECES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_piece_composes_with_default(path, capsys):
    print_config(capsys, [ROOT / "configs/default.yaml", path])


def test_from_scratch_r2et_config_clips_gradients(capsys):
    out = print_config(capsys, [ROOT / "configs/experiment/cifar10_r2et_finetune.yaml"])
    assert "gradient_clip_val: 5.0" in out
