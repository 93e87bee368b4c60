"""benchmarks/pse_report.py: described options, the config's PSE budget as the default."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("pse_report", REPO / "benchmarks" / "pse_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_is_described_and_the_budget_comes_from_the_config(tmp_path):
    report = _module()
    p = report.parser()
    undescribed = [a.dest for a in p._actions if a.dest != "help" and not a.help]
    assert undescribed == []
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.PSEAnalysis\n"
                   "      init_args: {eps: 0.2, steps: 7, num_samples: 3}\n")
    assert report.config_defaults([str(cfg)]) == {"eps": 0.2, "steps": 7}
    assert report.config_defaults([str(REPO / "configs/default.yaml")])["eps"] == 0.1254902
    p.set_defaults(**report.config_defaults([str(cfg)]))
    args = p.parse_args(["--ckpt", "x", "--out", "y", "-c", str(cfg)])
    assert (args.eps, args.steps) == (0.2, 7)
    assert p.parse_args(["--ckpt", "x", "--out", "y", "--eps", "0.05"]).eps == 0.05  # a flag wins
