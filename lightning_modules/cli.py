"""The command line: LightningCLI over RobustClassifier and any LightningDataModule.

``python train.py fit -c configs/default.yaml`` trains; ``validate``/``test`` evaluate a checkpoint
(``--ckpt_path``); ``--print_config`` shows the merged configuration. Config files compose:
later ``-c`` files override earlier ones (e.g. trainer/, data/, model/ pieces).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.checkpoints import (
    RUNTIME_KEYS,
    AtomicCheckpointIO,
    CheckpointReadError,
    format_hparams_differences,
    hparams_differences,
    read_checkpoint,
)
from lightning_modules.classifier import RobustClassifier, check_precision, check_sync_batchnorm
from lightning_modules.reliability import (
    UnwritableDirError,
    check_output_dirs,
    checkpoint_dirs,
    disk_full_message,
    find_last_checkpoint,
    raise_on_sigterm,
)


SIGTERM_MESSAGE = ("error: stopped by SIGTERM; checkpoints are written atomically, so the last complete one is "
                   "intact (fit: resume with --ckpt_path last)")

#: The built-in configuration, used when ``fit``/``validate``/``test`` get no ``-c``/``--config``.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _has_key(mapping: Any, dotted: str) -> bool:
    """Whether nested mappings hold the dotted key (``settings.eps``: mapping["settings"]["eps"])."""
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return False
        mapping = mapping[part]
    return True


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class ConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` to the log folder and give the full resolved config (trainer, seed,
    callbacks with their init args, model, data) to every logger that takes it
    (``RobustWandbLogger.log_config``: W&B run config plus the uploaded ``config.yaml``)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False)) or {}
        config.pop("config", None)
        # trainer.log_dir broadcasts (a collective): this runs on rank 0 only, so read the logger's
        first = trainer.loggers[0] if trainer.loggers else None
        log_dir = (getattr(first, "log_dir", None) or getattr(first, "save_dir", None)) if first else trainer.default_root_dir
        path = os.path.join(log_dir, self.config_filename) if self.save_to_log_dir and log_dir else None
        for logger in trainer.loggers:
            if hasattr(logger, "log_config"):
                logger.log_config(config, path)


_CLASS_LINE = re.compile(r"Problem with given class_path '([\w.]+)'")
_UNKNOWN_KEY = re.compile(r"^(?:Group '([\w.]+)' does not accept option|Option) '(\w+)'(?: is not accepted)?$")
_UNKNOWN_FLAG = re.compile(r"^unrecognized arguments: --(?:init_args\.)?(?:([\w.]+)\.)?(\w+)(?:[= ]|$)")


def _parameter_types(cls: type) -> dict[str, Any] | None:
    """{name: annotation} of a class's constructor (dataclass fields included), or None."""
    try:
        params = inspect.signature(cls).parameters
        hints = typing.get_type_hints(cls.__init__)
    except (TypeError, ValueError, NameError):
        return None
    return {name: hints.get(name) for name, p in params.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _valid_keys(class_path: str, group: str | None, key: str) -> str | None:
    """'valid: ...' for an unknown ``key`` of ``class_path``'s arguments (or of its dataclass-typed
    argument ``group``); with a hint when ``key`` is a field of one of its dataclass arguments."""
    module, _, name = class_path.rpartition(".")
    try:
        owner = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    types = _parameter_types(owner)
    for part in (group.split(".") if group else []):
        hint = (types or {}).get(part)
        types = _parameter_types(hint) if dataclasses.is_dataclass(hint) else None
    if not types:
        return None
    text = f"valid: {', '.join(types)}"
    nested = [n for n, hint in types.items() if dataclasses.is_dataclass(hint) and key in (_parameter_types(hint) or {})]
    if nested:
        text += f" ('{key}' is a field of '{nested[0]}': write {nested[0]}: {{{key}: ...}})"
    return text


def name_valid_keys(message: str) -> str:
    """jsonargparse's error ``message`` with the valid keys added to each "not accepted" line of a
    class's arguments (jsonargparse names the unknown key only)."""
    lines, owners = [], []  # owners: (indent, class_path) of the enclosing "Problem with given class_path" lines
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip())
        while owners and owners[-1][0] >= indent:
            owners.pop()
        found = _CLASS_LINE.search(line)
        unknown = _UNKNOWN_KEY.match(line.strip()) or _UNKNOWN_FLAG.match(line.strip())
        if found:
            owners.append((indent, found.group(1)))
        elif unknown and owners:
            valid = _valid_keys(owners[-1][1], unknown.group(1), unknown.group(2))
            line += f"; {valid}" if valid else ""
        lines.append(line)
    return "\n".join(lines)


class RobustArgumentParser(LightningArgumentParser):
    """The CLI's parser: an unknown key of a class's arguments is refused with the valid ones."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(name_valid_keys(message), ex)


class RobustCLI(LightningCLI):
    """LightningCLI with the project's defaults and early configuration checks.

    - ``fit``/``validate``/``test`` without ``-c`` use ``configs/default.yaml`` (said in one line).
    - ``--ckpt_path FILE``: settings given in config files or flags that disagree with the
      checkpoint's are refused with the list of differences, unless ``--override_ckpt_hparams
      true`` (then applied, listed); settings not given come from the checkpoint, except the
      ``RUNTIME_KEYS`` (compile, fast_batchnorm, lean_layers, nonfinite, init_from, pretrained,
      weights_file), which are always the run's.
    - ``--ckpt_path last``: the newest checkpoint of this logger name (all versions), refused when
      it was trained with other model settings (another run sharing the log folder).
    - the model is checked against the DataModule (num_classes, in_chans, k, pool) before the
      trainer runs (before W&B starts); checkpoints are written atomically.
    - ``predict`` is not offered (the project has no prediction writer) and there is one optimizer
      setting, ``--model.optimizer``.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--override_ckpt_hparams", type=bool, default=False,
            help="With --ckpt_path FILE: apply the model settings given here where they differ from the "
                 "checkpoint's (listed), instead of refusing them.",
        )
        parser.add_argument(
            "--allow_random_weights", type=bool, default=False,
            help="validate/test: evaluate a model without trained weights (no --ckpt_path, weights_file, "
                 "pretrained or init_from), e.g. as a baseline; refused otherwise.",
        )
        parser.add_argument(
            "--allow_other_data", type=bool, default=False,
            help="validate/test: evaluate on data other than the checkpoint was trained on (another "
                 "DataModule class), or external weights on the synthetic data; refused otherwise.",
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        for key, count in getattr(self, "_integer_limits", {}).items():
            if config.get(key) == float(count):
                config[key] = count  # `1` means one batch (the parser made it 1.0 = all)
        return super()._instantiate_trainer(config, callbacks)

    # ---- --ckpt_path FILE: the checkpoint's settings against the user's
    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        section = self.config[subcommand]
        ckpt_path = section.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        try:
            checkpoint = read_checkpoint(ckpt_path, "--ckpt_path checkpoint")
        except (FileNotFoundError, CheckpointReadError) as exc:
            raise SystemExit(f"error: {exc}") from None
        saved = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
            # what RobustClassifier.checkpoint_problems reads, tensors as shapes only (meta device)
            shapes = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in checkpoint["state_dict"].items()}
            self._ckpt_file = (ckpt_path, {"hyper_parameters": dict(saved), "state_dict": shapes})
        saved.pop("_instantiator", None)
        saved.pop("_class_path", None)
        if not saved:
            return
        current = _plain(section.get("model")) or {}
        defaults = _plain(self._subcommand_parsers[subcommand].get_defaults().get("model")) or {}
        explicit = {k for k in current if k not in defaults or hparams_differences({k: defaults[k]}, {k: current[k]}, ignore=())}
        diff = hparams_differences(saved, current, keys=sorted(explicit & set(saved)))
        merged = dict(saved)
        if diff:
            listed = format_hparams_differences(diff)
            if not section.get("override_ckpt_hparams"):
                raise SystemExit(
                    f"error: --ckpt_path {ckpt_path} was trained with other model settings than the ones given "
                    f"here: {listed}. Drop these settings to use the checkpoint's, or add "
                    "--override_ckpt_hparams true to apply yours."
                )
            rank_zero_info(f"--ckpt_path {ckpt_path}: applying settings that differ from the checkpoint's: {listed}")
            merged.update({k: current[k] for k in diff})
        for key in RUNTIME_KEYS:
            if key in current:
                merged[key] = current[key]  # how the step runs / where it starts: the run decides
        self.config = self.parser.parse_object({subcommand: {"model": merged}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer", {})
        objective = config.get("model", {}).get("objective", "vanilla")
        try:  # before anything is built (the model repeats these in on_fit_start)
            check_sync_batchnorm(objective, bool(trainer.get("sync_batchnorm")))
            check_precision(objective, trainer.get("precision"))
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None
        self._check_callback_flags(trainer)
        check_batch_limits(self.subcommand, trainer, getattr(self, "_integer_limits", {}))
        check_output_dirs(trainer)  # before the loggers exist: their constructors may write
        if self.subcommand in ("validate", "test"):
            self._check_what_is_evaluated(config)

    def _check_what_is_evaluated(self, config: Any) -> None:
        """validate/test: refuse a model without trained weights, and a checkpoint or external weights
        on data they were not trained on (before W&B and before any batch)."""
        model = _plain(config.get("model")) or {}
        ckpt = config.get("ckpt_path")
        trained = ckpt or model.get("weights_file") or model.get("pretrained") or model.get("init_from")
        if not trained and not config.get("allow_random_weights"):
            raise SystemExit(
                f"error: `{self.subcommand}` would evaluate a model with randomly initialised weights: no "
                "--ckpt_path, --model.weights_file, --model.pretrained true or --model.init_from was given. Give the "
                "weights to evaluate, or --allow_random_weights true to evaluate an untrained model on purpose."
            )
        if config.get("allow_other_data"):
            return
        data = _plain(config.get("data")) or {}
        data_class = data.get("class_path") if isinstance(data, dict) else None
        if ckpt and ckpt not in ("last", "best", "hpc", "registry") and os.path.isfile(ckpt) and data_class:
            saved = (read_checkpoint(ckpt) or {}).get("datamodule_hyper_parameters") or {}
            trained_on = saved.get("_class_path")
            if trained_on and trained_on != data_class:
                raise SystemExit(
                    f"error: --ckpt_path {ckpt} was trained on {trained_on}, but this run evaluates it on "
                    f"{data_class}. Give the data it was trained on (e.g. -c configs/data/<name>.yaml), or "
                    "--allow_other_data true to evaluate it on other data on purpose."
                )
        external = model.get("weights_file") or model.get("pretrained")
        if external and not ckpt and str(data_class).endswith("SyntheticDataModule"):
            source = f"weights_file {model.get('weights_file')}" if model.get("weights_file") else "pretrained timm weights"
            raise SystemExit(
                f"error: the model's weights ({source}) were not trained on the built-in synthetic glyph data, "
                "which this run would evaluate them on (the data of configs/evaluate.yaml). Give the data they were "
                "trained on, e.g. -c configs/data/cifar10.yaml --data.init_args.data_dir DIR, or "
                "--allow_other_data true."
            )

    def _check_callback_flags(self, trainer: Any) -> None:
        """``--trainer.callbacks.KEY=V`` / ``--trainer.logger.KEY=V`` (KEY may be nested, e.g.
        ``settings.eps``) sets KEY on the last callback (logger) of the list: refuse it when several
        configured ones have KEY (it would silently change only one of them)."""
        for section, flags in (("callbacks", getattr(self, "_callback_flags", [])),
                               ("logger", getattr(self, "_logger_flags", []))):
            entries = _plain(trainer.get(section)) or []
            entries = entries if isinstance(entries, list) else [entries]
            for flag in flags:
                key = flag.removeprefix("init_args.")
                if key.split(".")[0] in ("class_path", "init_args"):
                    continue
                having = [c.get("class_path", "?").rsplit(".", 1)[-1] for c in entries
                          if isinstance(c, dict) and _has_key(c.get("init_args") or {}, key)]
                if len(having) > 1:
                    plural = {"callbacks": "callbacks", "logger": "loggers"}[section]
                    raise SystemExit(
                        f"error: --trainer.{section}.{flag} is ambiguous: {len(having)} {plural} have {key!r} "
                        f"({', '.join(having)}) and the flag changes only the last one. Set it per entry in a "
                        f"config file (-c, a trainer.{section} list), e.g. configs/debug/quick.yaml."
                    )

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it with SIGTERM raising at once (not at the end of a step that can take a minute)."""
        with raise_on_sigterm(lambda: SIGTERMException(SIGTERM_MESSAGE)):
            super()._run_subcommand(subcommand)

    # ---- reliability (see README "Reliability"): safe loading, writable outputs, `ckpt_path: last`
    def before_fit(self) -> None:
        check_output_dirs(self.trainer)  # unwritable/full log or checkpoint folder: fail now, clearly
        self._before_run()

    def before_validate(self) -> None:
        self._before_run()

    def before_test(self) -> None:
        self._before_run()

    def _before_run(self) -> None:
        """Checks and wiring that must happen before the trainer starts (and W&B with it)."""
        if self.datamodule is not None:
            try:
                self.model.check_data(self.datamodule)
            except ValueError as exc:
                raise SystemExit(f"error: {exc}") from None
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            strategy.checkpoint_io = AtomicCheckpointIO()
        self._resolve_checkpoint_args()
        self._warn_seen_split()
        kwargs = self.config_init[self.subcommand]
        self._check_ckpt_fits(kwargs.get("ckpt_path"))
        if self.subcommand in ("validate", "test") and any(
            type(c).__name__ == "FinalSummary" for c in self.trainer.callbacks
        ):
            kwargs["verbose"] = False  # FinalSummary prints the metrics once, in sections
        self._resume_wandb_run(kwargs.get("ckpt_path"))

    def _warn_seen_split(self) -> None:
        """validate with external weights on a validation split carved from the training data: say so."""
        hparams = self.model.hparams
        external = hparams.get("weights_file") or hparams.get("pretrained")
        held_out = getattr(self.datamodule, "held_out", None)
        if self.subcommand == "validate" and external and callable(held_out) and not held_out("val"):
            describe = getattr(self.datamodule, "describe_split", None)
            where = describe("val") if callable(describe) else "carved from the training split"
            rank_zero_warn(
                f"validate evaluates the validation split, {where}; the model's weights "
                f"({'weights_file ' + str(hparams.get('weights_file')) if hparams.get('weights_file') else 'pretrained'}) "
                "come from outside this run and were likely trained on these images. Use `test` for numbers on "
                "held-out images."
            )

    def _check_ckpt_fits(self, ckpt_path: str | None) -> None:
        """``--ckpt_path FILE`` whose weights do not fit the model: refused now, before the trainer
        starts (and W&B with it), with the reasons ``on_load_checkpoint`` would give later."""
        read = getattr(self, "_ckpt_file", None)
        if read is None or ckpt_path != read[0] or not hasattr(self.model, "checkpoint_problems"):
            return
        problems = self.model.checkpoint_problems(read[1])
        if problems:
            raise SystemExit(f"error: --ckpt_path {ckpt_path}: {problems}")

    def _resume_wandb_run(self, ckpt_path: str | None) -> None:
        """``fit --ckpt_path``: continue the W&B run the checkpoint was logged to (resume="allow")."""
        if self.subcommand != "fit" or not ckpt_path or not os.path.isfile(ckpt_path):
            return
        run_id = (read_checkpoint(ckpt_path) or {}).get("wandb_run_id")
        for logger in self.trainer.loggers:
            if run_id and hasattr(logger, "resume_run"):
                logger.resume_run(run_id)

    def _resolve_checkpoint_args(self) -> None:
        kwargs = self.config_init[self.subcommand]
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True  # never unpickle arbitrary objects from a checkpoint
        if kwargs.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer)
            if found is not None:
                try:
                    checkpoint = read_checkpoint(found, "--ckpt_path last checkpoint")
                except CheckpointReadError as exc:
                    raise SystemExit(f"error: {exc}") from None
                saved = checkpoint.get("hyper_parameters") or {} if isinstance(checkpoint, dict) else {}
                diff = hparams_differences(saved, dict(self.model.hparams))
                if diff:
                    raise SystemExit(
                        f"error: --ckpt_path last found {found}, but it belongs to another run: it was trained "
                        f"with {format_hparams_differences(diff)}. Give this run its own logger name "
                        "(--trainer.logger.init_args.name) or pass that checkpoint file as --ckpt_path FILE "
                        "to fine-tune from it with model.init_from."
                    )
                rank_zero_info(f"--ckpt_path last: resuming from {found}")
                kwargs["ckpt_path"] = found
            elif self.subcommand in ("validate", "test"):
                raise SystemExit(
                    f"error: --ckpt_path last: no checkpoint found in "
                    f"{checkpoint_dirs(self.trainer) or 'any checkpoint folder'} (the checkpoint folders of this "
                    f"run's logger name), so `{self.subcommand}` has no trained weights to evaluate. Give the "
                    "checkpoint file: --ckpt_path path/to/last.ckpt"
                )
            else:
                rank_zero_warn(
                    f"--ckpt_path last: no checkpoint found in {checkpoint_dirs(self.trainer) or 'any checkpoint folder'}; "
                    "starting from scratch"
                )
                kwargs["ckpt_path"] = None


def _cli_classes() -> dict[str, Any]:
    """What the command line is built over (``main`` and ``build_from_configs``)."""
    return dict(model_class=RobustClassifier, datamodule_class=LightningDataModule, subclass_mode_data=True,
                trainer_defaults={"inference_mode": False}, auto_configure_optimizers=False,
                parser_class=RobustArgumentParser)


def _prepare(given: list[str]) -> None:
    """Checks of the raw arguments, and what the CLI's checks need to know about them."""
    check_config_files(given)
    RobustCLI._integer_limits = integer_batch_limits(given)
    RobustCLI._callback_flags = [a.split("=", 1)[0][len("--trainer.callbacks."):] for a in given
                                 if a.startswith("--trainer.callbacks.")]
    RobustCLI._logger_flags = [a.split("=", 1)[0][len("--trainer.logger."):] for a in given
                               if a.startswith("--trainer.logger.")]


def main(args=None) -> RobustCLI:
    """Entry point used by train.py (and by tests, with ``args``).

    An unwritable output folder or a full disk ends the run with one clear line (exit status 1).
    """
    if args is None:  # from the command line: keep LightningCLI reading sys.argv (DDP relaunches it)
        sys.argv[1:] = with_default_config(sys.argv[1:])
        given = sys.argv[1:]
    else:
        args = given = with_default_config(list(args))
    _prepare(given)
    try:
        return RobustCLI(
            **_cli_classes(),
            save_config_callback=ConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except UnwritableDirError as exc:
        raise SystemExit(f"error: {exc}") from None
    except SIGTERMException as exc:  # Lightning's own is raised without a message (exit status 0)
        raise SystemExit(exc.code if isinstance(exc.code, str) else SIGTERM_MESSAGE) from None
    except OSError as exc:
        message = disk_full_message(exc)
        if message is None:
            raise
        raise SystemExit(message) from exc


def build_from_configs(configs: list[str | Path]) -> RobustCLI:
    """What ``train.py`` builds from these config files (later ones win), without running anything.

    The same parser and checks as ``main``; ``cli.datamodule``, ``cli.trainer.callbacks`` and
    ``cli.model`` are the configured objects. Nothing is seeded (``seed_everything`` off), no
    loggers are built, and the model is built without reading any weights (``pretrained``,
    ``weights_file`` and ``init_from`` off): this is for tools whose weights come from elsewhere
    (``benchmarks/pse_report.py --ckpt``).
    """
    args = [arg for config in configs for arg in ("-c", str(config))]
    args += ["--seed_everything=false", "--trainer.logger=false", "--model.pretrained=false",
             "--model.weights_file=null", "--model.init_from=null"]
    _prepare(args)
    return RobustCLI(**_cli_classes(), save_config_callback=None, args=args, run=False)


def with_default_config(args: list[str]) -> list[str]:
    """``fit``/``validate``/``test`` with no ``-c``/``--config``: add ``-c configs/default.yaml``."""
    if not args or args[0] not in ("fit", "validate", "test"):
        return args
    rest = args[1:]
    if any(a in ("-c", "--config") or a.startswith(("--config=", "-c=")) for a in rest):
        return args
    if any(a in ("-h", "--help") for a in rest):
        return args
    print(f"no -c/--config given: using the built-in default {DEFAULT_CONFIG}", file=sys.stderr)
    return [args[0], "-c", str(DEFAULT_CONFIG), *rest]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with the same key twice (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping (lines {seen[key].start_mark.line + 1} "
                    f"and {key_node.start_mark.line + 1}); YAML would silently keep the last one: remove one",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def check_config_files(args: list[str]) -> None:
    """Refuse a ``-c``/``--config`` file with a duplicated key, naming the file, key and lines."""
    for i, arg in enumerate(args):
        name, sep, value = arg.partition("=")
        if name not in ("-c", "--config"):
            continue
        path = value if sep else (args[i + 1] if i + 1 < len(args) else None)
        if not path or not os.path.isfile(path):
            continue  # the parser reports a missing file
        try:
            yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
        except yaml.constructor.ConstructorError as exc:
            raise SystemExit(f"error: config file {path}: {exc.problem}") from None
        except yaml.YAMLError:
            continue  # the parser reports syntax errors


_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "overfit_batches")
#: The batch limit that decides whether a subcommand does any work at all.
_WORK_LIMITS = {"fit": ("limit_train_batches",), "validate": ("limit_val_batches",), "test": ("limit_test_batches",)}


def check_batch_limits(subcommand: str | None, trainer: Any, written: dict[str, int] | None = None) -> None:
    """Refuse a batch limit of 0 (or below) that leaves the subcommand nothing to do: ``fit`` with
    ``limit_train_batches: 0`` trains nothing, ``validate`` with ``limit_val_batches: 0`` and
    ``test`` with ``limit_test_batches: 0`` evaluate nothing, and each would exit 0.
    (``limit_val_batches: 0`` in ``fit`` is the usual way to skip validation and stays valid;
    ``overfit_batches > 0`` replaces the train and val limits.) ``written``: the limits as integers
    where the user wrote integers (:func:`integer_batch_limits`), to name the value as written."""
    trainer = trainer or {}
    overfit = trainer.get("overfit_batches")
    for key in _WORK_LIMITS.get(subcommand or "", ()):
        if key != "limit_test_batches" and isinstance(overfit, (int, float)) and overfit > 0:
            continue  # overfit_batches replaces the train and val limits
        value = trainer.get(key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value <= 0:
            if (written or {}).get(key) == value:
                value = written[key]
            raise SystemExit(
                f"error: trainer.{key}={value!r} gives `{subcommand}` no batch to run (it would do nothing and "
                f"exit 0); valid: an integer >= 1 (batches) or a fraction in (0, 1] (of the batches)"
            )


def integer_batch_limits(args: list[str]) -> dict[str, int]:
    """Batch limits written as integers in the config files or flags (the last one wins).

    LightningCLI parses ``limit_val_batches: 1`` as ``1.0`` (all batches, Lightning #21259); the
    CLI restores the integer so that ``1`` means one batch, as written.
    """
    found: dict[str, int] = {}

    def note(key: str, value: Any) -> None:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                return
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
        else:
            found.pop(key, None)

    i = 0
    while i < len(args):
        name, sep, value = args[i].partition("=")
        limit = name[len("--trainer."):] if name.startswith("--trainer.") else None
        wanted = name in ("-c", "--config") or limit in _LIMITS
        if wanted and not sep:  # the value is the next argument
            if i + 1 >= len(args):
                break
            value, i = args[i + 1], i + 1
        i += 1
        if not wanted:
            continue
        if limit in _LIMITS:
            note(limit, value)
            continue
        try:
            data = yaml.safe_load(Path(value).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        trainer = data.get("trainer") if isinstance(data, dict) else None
        for key in _LIMITS:
            if isinstance(trainer, dict) and key in trainer:
                note(key, trainer[key])
    return found
