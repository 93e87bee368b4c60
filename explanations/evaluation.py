"""The one explanation-robustness evaluation protocol (DESIGN §5), framework-free.

The per-epoch callback (``callbacks.RankingRobustness``), the standalone evaluation
(``train.py validate|test -c configs/evaluate.yaml``) and the reproduction study
(``benchmarks/reproduce``) all call :class:`EvaluationProtocol`, so the same model, images and
settings give the same numbers everywhere.

For every image x (dataset index ``id``), explanation method and budget eps (l_inf, pixel units)
it runs an ensemble of attacks (default: ERAttack, ERAttack through a Softplus surrogate
``surrogate_beta: auto``, MSEAttack, uniform noise of the same eps) and records per attack:

- ``p_at_k``: |T_k(x) ∩ T_k(x')| / k;
- ``spearman`` / ``kendall``: rank correlation on the union of both top-k sets;
- ``flip_rate``: 1 where the returned image's prediction differs from the clean one;
- ``localization``: top-k share inside the ground-truth mask (datasets with masks);

plus the per-image **worst case** over the ensemble: at eps_j it is the (attack, eps_i <= eps_j)
result with the lowest P@k (a smaller ball lies inside the larger one), so the worst-case P@k of
an image never increases with eps and is at most every single attack's, noise included. Ties
keep the earlier eps, then the earlier attack of the list; the other metrics of the worst case
are those of the chosen result. Thickness (``all_pairs`` and ``boundary``,
``ranking_metrics.thickness_estimates``) is measured at ``thickness_eps`` (default: the largest eps).

Randomness is keyed by (seed, id): attack starts, the noise baseline (``attacks.UniformNoise``),
thickness end points, and the PSE target draws (``explanations.pse.pse_target_uniform``), each on its stream of
:mod:`explanations.streams`, so batches, DDP shards and the three callers agree sample for sample.

Values are per image (``EvaluationResult.values``: flat keys like ``p_at_k/worst/gradient/eps_8``,
tensors (N,)); :func:`explanations.report.build_report` turns their means into the JSON report
(:mod:`explanations.plots` draws it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from explanations.activations import resolve_surrogate, traces_reused
from explanations.attacks import ATTACKS, UniformNoise, attack_class, build_attack, check_attack_options
from explanations.explainers import check_method, eval_mode, explain_unchecked
from explanations.ranking_metrics import (
    CORRELATIONS,
    localization_share,
    precision_at_k,
    rank_correlation,
    thickness_estimates,
)
from explanations.regularizers import check_pair_set
from explanations.saliency import check_target, num_features, resolve_k
from explanations.validation import check_eps, check_images, check_k, check_pool, check_positive_int, check_steps

NOISE = UniformNoise.name  # the registered noise baseline, ``noise``
WORST = "worst"
DEFAULT_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
DEFAULT_ENSEMBLE: tuple[dict[str, Any], ...] = (
    {"name": "er", "kwargs": {"surrogate_beta": None}},
    {"name": "er_surrogate", "attack": "er", "kwargs": {"surrogate_beta": "auto"}},
    {"name": "mse"},
    {"name": NOISE},
)
#: Thickness pair set (``ranking_metrics.THICKNESS_PAIR_SETS``) -> its name in metric keys and reports.
THICKNESS_KEYS: dict[str, str] = {"all": "all_pairs", "boundary": "boundary"}
_SPEC_KEYS = {"name", "attack", "kwargs"}


def eps_label(eps: float) -> str:
    """``8/255`` for eps = 8/255 (JSON keys); non-integer multiples as ``0.5/255``."""
    v = eps * 255
    return f"{round(v)}/255" if abs(v - round(v)) < 1e-6 else f"{v:.3g}/255"


def eps_tag(eps: float) -> str:
    """``eps_8`` for eps = 8/255 (metric-name suffix)."""
    return f"eps_{eps * 255:.3g}"


@dataclass(frozen=True)
class AttackSpec:
    """One ensemble member: display ``name``, ``attack`` (a key of ATTACKS), kwargs (its options)."""

    name: str
    attack: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_attacks(attacks: Sequence[str | dict[str, Any]] | None, noise: bool = True) -> list[AttackSpec]:
    """Ensemble specs from names or ``{name, attack, kwargs}`` dicts (None: the default ensemble).

    ``noise=True`` appends the noise baseline when the list has none; ``False`` leaves it out of
    the default ensemble and refuses a given list that names it (the two settings contradict).
    A member's kwargs must be options of its attack (``ATTACKS[attack].options``; TypeError).
    """
    items = list(DEFAULT_ENSEMBLE if attacks is None else attacks)
    valid = sorted(ATTACKS)
    specs: list[AttackSpec] = []
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"attack entry {item!r} must be a name or a dict with a 'name' (and 'attack', 'kwargs')")
        unknown = sorted(set(item) - _SPEC_KEYS)
        if unknown:
            raise ValueError(f"attack entry {item!r} has unknown keys {unknown}; valid: {sorted(_SPEC_KEYS)}")
        name, kind = str(item["name"]), str(item.get("attack", item["name"]))
        if kind not in valid:
            raise ValueError(f"attack {kind!r} (entry {name!r}) is not known; valid: {valid}")
        if name == WORST:
            raise ValueError(f"attack name {WORST!r} is reserved for the worst case over the ensemble")
        kwargs = dict(item.get("kwargs") or {})
        check_attack_options(kind, kwargs, entry=name)
        specs.append(AttackSpec(name, kind, kwargs))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must be unique, got {names}")
    if not noise:
        named = [s.name for s in specs if s.attack == NOISE]
        if attacks is not None and named:
            raise ValueError(
                f"the attack list names {NOISE!r} (entry {', '.join(map(repr, named))}) but the noise baseline is off "
                "(noise: false): drop one"
            )
        specs = [s for s in specs if s.attack != NOISE]
    elif not any(s.attack == NOISE for s in specs):
        specs.append(AttackSpec(NOISE, NOISE))
    if not specs:
        raise ValueError("the attack ensemble is empty: give at least one attack or keep the noise baseline")
    return specs


def check_shared_attack_kwargs(specs: Sequence[AttackSpec], attack_kwargs: dict[str, Any]) -> None:
    """Refuse ``attack_kwargs`` keys that no member's attack takes (they would have no effect)."""
    taken = set().union(*(attack_class(s.attack).options for s in specs))
    unknown = sorted(set(attack_kwargs) - taken)
    if unknown:
        raise TypeError(
            f"attack_kwargs {unknown} are taken by no attack of the ensemble ({', '.join(s.name for s in specs)}); "
            f"their options: {sorted(taken)}"
        )


@dataclass
class EvaluationResult:
    """Per-image values (N,) under flat keys (see the module docstring), their ids and notes.

    ``images``: up to ``keep_images`` images per method for plots: ``x``, ``s`` (clean saliency),
    ``x_adv``, ``s_adv`` and ``source`` (attack name) of the worst case at the largest eps.
    """

    values: dict[str, Tensor]
    ids: Tensor
    notes: list[str] = field(default_factory=list)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per attack (all eps, methods)
    labels: Tensor | None = None  # (N,) the images' labels

    @property
    def num_images(self) -> int:
        return int(self.ids.numel())

    def means(self) -> dict[str, float]:
        """Mean of every key over the images (NaNs, e.g. undefined correlations, left out)."""
        return means_from_sums(sorted(self.values), *moment_sums(self.values)[:2])

    def standard_errors(self) -> dict[str, float]:
        """Standard error of each mean, sd / sqrt(n) (NaN with fewer than 2 values)."""
        return standard_errors(sorted(self.values), *moment_sums(self.values))

    @staticmethod
    def cat(parts: Sequence["EvaluationResult"]) -> "EvaluationResult":
        """Concatenate batch results (same keys), images from the first batches."""
        if not parts:
            raise ValueError("no batch results to concatenate")
        keys = list(parts[0].values)
        values = {k: torch.cat([p.values[k] for p in parts]) for k in keys}
        images: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {}
        for p in parts:
            for method, item in p.images.items():
                images.setdefault(method, item)
            for name, sec in p.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + sec
        labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
        return EvaluationResult(values, torch.cat([p.ids for p in parts]), list(parts[0].notes), images, seconds,
                                labels)


def moment_sums(values: dict[str, Tensor], keys: Sequence[str] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """float64 sums, counts and sums of squares of the non-NaN values of each key (``keys``,
    default the sorted keys of ``values``; a missing key counts nothing): three (K,) tensors,
    summable over batches and DDP ranks."""
    keys = sorted(values) if keys is None else list(keys)
    total = torch.zeros(len(keys), dtype=torch.float64)
    count = torch.zeros(len(keys), dtype=torch.float64)
    squares = torch.zeros(len(keys), dtype=torch.float64)
    for i, key in enumerate(keys):
        if key not in values:
            continue
        v = values[key].detach().double().flatten().cpu()
        v = v[~torch.isnan(v)]
        total[i], count[i], squares[i] = v.sum(), v.numel(), v.square().sum()
    return total, count, squares


def means_from_sums(keys: Sequence[str], total: Tensor, count: Tensor) -> dict[str, float]:
    """{key: sum / count} (NaN where nothing was counted), e.g. after a DDP sum-reduction."""
    return {k: (float(t / c) if c > 0 else float("nan")) for k, t, c in zip(keys, total.tolist(), count.tolist())}


def standard_errors(keys: Sequence[str], total: Tensor, count: Tensor, squares: Tensor) -> dict[str, float]:
    """{key: s / sqrt(n)} with the sample variance s^2 = (sum x^2 - n mean^2) / (n - 1); NaN for n < 2."""
    out = {}
    for k, t, c, q in zip(keys, total.tolist(), count.tolist(), squares.tolist()):
        if c < 2:
            out[k] = float("nan")
            continue
        var = max(q - t * t / c, 0.0) / (c - 1)
        out[k] = math.sqrt(var / c)
    return out


class EvaluationStopped(Exception):
    """A stop request (e.g. SIGTERM) ended an evaluation between two attack passes."""


@dataclass(frozen=True)
class ProtocolSettings:
    """The evaluation protocol's settings: one object, given once and passed down whole (the
    per-epoch callback ``RankingRobustness(protocol=...)``, the standalone evaluation
    ``configs/evaluate.yaml`` and the study all take it). Checked when built.

    Args:
        eps: l_inf budgets in (0, 1], pixel units (default 1, 2, 4, 8 /255); sorted ascending.
        attacks: ensemble members: names (keys of ``ATTACKS``: ``er``, ``mse``, ``noise``) or dicts
            ``{name, attack, kwargs}`` (options of the attack class, ``ATTACKS[attack].options``, e.g.
            ``steps``, ``restarts``, ``surrogate_beta``; ``draws`` for noise; another key is refused);
            None = ERAttack without surrogate, ERAttack with
            ``surrogate_beta: auto``, MSEAttack, noise.
            ``surrogate_beta: auto`` resolves per model (explanations.activations); a member whose
            auto surrogate is None (a smooth model) is dropped with a note, since it would equal
            the same attack without one.
        noise: keep (append) the uniform-noise baseline; False with a list naming ``noise`` is refused.
        k: top-k size (an int count, or a fraction of the n features in (0, 1)); None = the
            model's (:meth:`for_model`), else 0.1.
        target: ``loss`` or ``logit`` (None = the model's, else ``loss``).
        pool: saliency pooling p (None = the model's, else pixels; 1 = pixels).
        pair_set: ERAttack's J (None = the model's, else ``boundary``).
        methods, method_kwargs: explanation methods attacked and their options.
        seed: picks the evaluation images and keys every per-sample random draw (with the image id).
        steps: attack steps (>= 1), for the attacks that take steps (the noise baseline does not).
        attack_kwargs: settings passed to every member that takes them (``step_size``, ``step``,
            ``random_start``, ``restarts``; not to the noise baseline); a key no member takes is refused.
        correlations, localization, thickness: which metrics to compute;
        thickness_samples, thickness_points, thickness_eps: Monte-Carlo thickness settings
            (thickness_eps None = the largest eps).

    Examples:
        >>> ProtocolSettings(eps=[2 / 255, 8 / 255], steps=5).resolved().k
        0.1
    """

    eps: list[float] = field(default_factory=lambda: list(DEFAULT_EPS))
    attacks: list[str | dict[str, Any]] | None = None
    noise: bool = True
    k: int | float | None = None
    target: Literal["loss", "logit"] | None = None
    pool: int | None = None
    pair_set: Literal["boundary", "all", "minmax"] | None = None
    methods: list[str] = field(default_factory=lambda: ["gradient"])
    method_kwargs: dict[str, dict[str, Any]] | None = None
    seed: int = 0
    steps: int = 10
    attack_kwargs: dict[str, Any] | None = None
    correlations: bool = True
    localization: bool = True
    thickness: bool = True
    thickness_samples: int = 2
    thickness_points: int = 4
    thickness_eps: float | None = None

    #: The settings that default to the model's (``model.hparams``) and their fallbacks.
    MODEL_DEFAULTS: ClassVar[dict[str, Any]] = {"k": 0.1, "target": "loss", "pool": None, "pair_set": "boundary"}

    def __post_init__(self) -> None:
        eps = self.eps if isinstance(self.eps, (list, tuple)) else [self.eps]
        eps_list = [check_eps(e) for e in eps]
        if not eps_list:
            raise ValueError(f"eps={self.eps!r} must be a budget in (0, 1] (pixel units, e.g. 8/255) or a non-empty list of them")
        if len(set(eps_list)) != len(eps_list):
            raise ValueError(f"eps={self.eps!r} lists a budget twice")
        object.__setattr__(self, "eps", sorted(eps_list))
        check_shared_attack_kwargs(parse_attacks(self.attacks, self.noise), self.attack_kwargs or {})
        if not self.methods:
            raise ValueError("methods must name at least one explanation method")
        unknown = sorted(set(self.method_kwargs or {}) - set(self.methods))
        if unknown:
            raise ValueError(f"method_kwargs given for {unknown}, which are not in methods={list(self.methods)}")
        for method in self.methods:
            check_method(method, (self.method_kwargs or {}).get(method))
        if self.target is not None:
            check_target(self.target)
        if self.pair_set is not None:
            check_pair_set(self.pair_set)
        if self.k is not None:
            check_k(self.k)
        check_pool(self.pool)
        check_steps(self.steps)
        check_positive_int(self.thickness_samples, "thickness_samples")
        check_positive_int(self.thickness_points, "thickness_points")
        if self.thickness_eps is not None:
            check_eps(self.thickness_eps, "thickness_eps")

    def for_model(self, hparams: Any) -> "ProtocolSettings":
        """k, target, pool and pair_set left None taken from the model's ``hparams`` (its training
        settings), else :data:`MODEL_DEFAULTS`: the one place these defaults are resolved."""
        get = hparams.get if hasattr(hparams, "get") else (lambda key, default=None: default)
        chosen = {name: getattr(self, name) if getattr(self, name) is not None else get(name, fallback)
                  for name, fallback in self.MODEL_DEFAULTS.items()}
        if chosen["pool"] is not None and chosen["pool"] <= 1:
            chosen["pool"] = None
        return replace(self, **chosen)

    def resolved(self) -> "ProtocolSettings":
        """Every model-dependent setting left None set to its fallback (no model)."""
        return self.for_model({})


class EvaluationProtocol:
    """Attack-ensemble evaluation of explanation rankings (see the module docstring).

    Args:
        settings: the :class:`ProtocolSettings` (None = the defaults); ``**overrides`` replace
            single fields of it (``EvaluationProtocol(eps=[8 / 255], steps=5)``).

    Examples:
        >>> from explanations.report import build_report
        >>> protocol = EvaluationProtocol(eps=[2 / 255, 8 / 255], k=10, steps=5)
        >>> protocol.k, protocol.steps
        (10, 5)
        >>> result = protocol.evaluate(model, [(images, labels, ids)])
        >>> report = build_report(protocol, result.means(), result.num_images)
        >>> sorted(report["p_at_k"]), sorted(report["p_at_k"]["worst"])
        (['er', 'er_surrogate', 'mse', 'noise', 'worst'], ['2/255', '8/255'])
    """

    def __init__(self, settings: ProtocolSettings | None = None, **overrides: Any) -> None:
        config = settings if settings is not None else ProtocolSettings()
        if overrides:
            unknown = sorted(set(overrides) - {f.name for f in fields(ProtocolSettings)})
            if unknown:
                raise TypeError(f"EvaluationProtocol got unknown settings {unknown}; valid: "
                                f"{[f.name for f in fields(ProtocolSettings)]}")
            config = replace(config, **overrides)
        self.config = config = config.resolved()
        self.eps = list(config.eps)
        self.specs = parse_attacks(config.attacks, config.noise)
        self.methods = list(config.methods)
        self.method_kwargs = {m: dict(v) for m, v in (config.method_kwargs or {}).items()}
        self.k, self.target, self.pool, self.pair_set = config.k, config.target, config.pool, config.pair_set
        self.seed, self.steps, self.attack_kwargs = int(config.seed), config.steps, dict(config.attack_kwargs or {})
        self.correlations, self.localization, self.thickness = config.correlations, config.localization, config.thickness
        self.thickness_samples, self.thickness_points = config.thickness_samples, config.thickness_points
        self.thickness_eps = float(config.thickness_eps) if config.thickness_eps is not None else max(self.eps)
        self._prepared: tuple[int, list[AttackSpec], list[str]] | None = None
        self.k_count: int | None = None  # k as a count, once checked against the data
        self.num_features: int | None = None  # saliency features n, idem

    # ------------------------------------------------------------------ settings
    @property
    def names(self) -> list[str]:
        """Attack names in ensemble order (before per-model resolution)."""
        return [s.name for s in self.specs]

    def settings(self) -> dict[str, Any]:
        """The protocol's settings as plain data (for run configs and reports)."""
        return dict(
            eps=[eps_label(e) for e in self.eps], attacks=[dict(name=s.name, attack=s.attack, kwargs=s.kwargs) for s in self.specs],
            k=self.k, target=self.target, pool=self.pool, pair_set=self.pair_set, methods=self.methods,
            method_kwargs=self.method_kwargs, seed=self.seed, steps=self.steps, attack_kwargs=self.attack_kwargs,
            thickness=self.thickness, thickness_samples=self.thickness_samples,
            thickness_points=self.thickness_points, thickness_eps=eps_label(self.thickness_eps),
        )

    def check_data(self, height: int, width: int) -> int:
        """Check k (and pool) against images of height x width; returns k as a count."""
        if self.pool is not None and (height % self.pool or width % self.pool):
            raise ValueError(f"pool={self.pool} does not divide the {height}x{width} images")
        n = num_features(height, width, self.pool)
        self.k_count, self.num_features = resolve_k(self.k, n), n
        return self.k_count

    def prepare(self, model: nn.Module, example: Tensor) -> tuple[list[AttackSpec], list[str]]:
        """Resolve the ensemble for ``model`` (surrogate ``auto``) and build every attack once, so a
        bad setting fails before any work. Returns (specs, notes)."""
        if self._prepared is not None and self._prepared[0] == id(model):
            return self._prepared[1], self._prepared[2]
        with traces_reused():
            return self._prepare(model, example)

    def _prepare(self, model: nn.Module, example: Tensor) -> tuple[list[AttackSpec], list[str]]:
        self.check_data(*example.shape[-2:])
        specs, notes = [], []
        for spec in self.specs:
            kwargs = dict(spec.kwargs)
            if "surrogate_beta" in kwargs:
                beta = resolve_surrogate(model, kwargs["surrogate_beta"], example)
                if beta is None and kwargs["surrogate_beta"] == "auto":
                    notes.append(
                        f"attack {spec.name!r} dropped: the model has no ReLU-type activations, so "
                        f"surrogate_beta=auto is no surrogate and {spec.name!r} would repeat {spec.attack!r}"
                    )
                    continue
                kwargs["surrogate_beta"] = beta
            resolved = AttackSpec(spec.name, spec.attack, kwargs)
            self._build(resolved, model, self.methods[0], self.eps[-1])  # validates the kwargs
            specs.append(resolved)
        self._prepared = (id(model), specs, notes)
        return specs, notes

    def _build(self, spec: AttackSpec, model: nn.Module, method: str, eps: float):
        """The member's attack at ``eps``: the protocol's settings and ``attack_kwargs`` that its
        class takes (``options``; e.g. the noise baseline takes no steps), then its own kwargs."""
        shared = dict(
            eps=eps, steps=self.steps, k=self.k, pair_set=self.pair_set, method=method,
            method_kwargs=self.method_kwargs.get(method) or None, target=self.target, pool=self.pool,
            seed=self.seed,
        )
        return build_attack(spec.attack, model, {**shared, **self.attack_kwargs}, **spec.kwargs)

    def keys(self, specs: Sequence[AttackSpec], has_mask: bool) -> list[str]:
        """Every per-image key one evaluation produces (sorted), the same on every rank."""
        out = ["accuracy"]
        sources = [s.name for s in specs] + [WORST]
        metrics = ["p_at_k", "flip_rate"] + (list(CORRELATIONS) if self.correlations else [])
        if has_mask and self.localization:
            metrics.append("localization")
        for method in self.methods:
            if has_mask and self.localization:
                out.append(f"localization/clean/{method}")
            if self.thickness:
                out += [f"thickness/{key}/{method}" for key in THICKNESS_KEYS.values()]
            out += [f"{m}/{src}/{method}/{eps_tag(e)}" for m in metrics for src in sources for e in self.eps]
        return sorted(out)

    # ------------------------------------------------------------------ the evaluation
    def evaluate_batch(
        self, model: nn.Module, x: Tensor, y: Tensor, ids: Tensor, mask: Tensor | None = None,
        keep_images: int = 0, should_stop: Callable[[], bool] | None = None,
    ) -> EvaluationResult:
        """Per-image values of one batch: x (B, C, H, W) in [0, 1], y (B,), ids (B,) dataset
        indices, mask (B, H, W) or None. The model runs in eval mode (restored).

        ``should_stop()`` is asked before every attack pass; True raises :class:`EvaluationStopped`.
        """
        check_images(x)
        specs, notes = self.prepare(model, x)
        x, ids = x.detach(), ids.to(x.device)
        values: dict[str, Tensor] = {}
        images: dict[str, dict[str, Any]] = {}
        seconds: dict[str, float] = {spec.name: 0.0 for spec in specs}
        keep = min(int(keep_images), x.shape[0])
        with torch.enable_grad(), eval_mode(model), traces_reused():
            for m_idx, method in enumerate(self.methods):
                mkw = self.method_kwargs.get(method, {})
                clean = explain_unchecked(model, x, y, method, self.target, self.pool, **mkw)
                s0, pred0 = clean.saliency.detach(), clean.logits.detach().argmax(1)
                classes = pred0 if self.target == "logit" else None
                if m_idx == 0:
                    values["accuracy"] = (pred0 == y).float()
                if mask is not None and self.localization:
                    values[f"localization/clean/{method}"] = localization_share(s0, mask, self.k, self.pool)
                if self.thickness:
                    thick = thickness_estimates(
                        model, x, y, self.k, self.thickness_eps, self.thickness_samples, self.thickness_points,
                        method, self.target, self.pool, ids, self.seed, mkw, s_clean=s0, classes=pred0,
                        pairs=tuple(THICKNESS_KEYS),
                    )
                    for pairs, key in THICKNESS_KEYS.items():
                        values[f"thickness/{key}/{method}"] = thick[pairs].detach()
                worst: dict[str, Tensor] | None = None
                worst_img: dict[str, Any] | None = None
                for eps in self.eps:
                    tag = eps_tag(eps)
                    for spec in specs:
                        if should_stop is not None and should_stop():
                            raise EvaluationStopped(f"stopped during the attack {spec.name!r} at eps {eps_label(eps)}")
                        start = time.perf_counter()
                        attack = self._build(spec, model, method, eps)
                        x_adv = attack(x, y, ids=ids).detach()
                        # the attack's own scoring pass at x_adv (same method, settings and classes),
                        # else (an attack that keeps none) one more explanation
                        adv = getattr(attack, "explanation", None)
                        if adv is None:
                            adv = explain_unchecked(model, x_adv, y, method, self.target, self.pool, classes=classes, **mkw)
                        seconds[spec.name] += time.perf_counter() - start
                        s_adv = adv.saliency.detach()
                        row = {"p_at_k": precision_at_k(s0, s_adv, self.k),
                               "flip_rate": (adv.logits.detach().argmax(1) != pred0).float()}
                        if self.correlations:
                            for corr in CORRELATIONS:
                                row[corr] = rank_correlation(s0, s_adv, self.k, corr)
                        if mask is not None and self.localization:
                            row["localization"] = localization_share(s_adv, mask, self.k, self.pool)
                        for metric, v in row.items():
                            values[f"{metric}/{spec.name}/{method}/{tag}"] = v
                        # running worst case over (eps' <= eps, attacks): strictly lower P@k wins
                        if worst is None:
                            worst = dict(row)
                            take = torch.ones_like(row["p_at_k"], dtype=torch.bool)
                        else:
                            take = row["p_at_k"] < worst["p_at_k"]
                            worst = {m: torch.where(take, row[m], worst[m]) for m in worst}
                        if keep:
                            t = take[:keep]
                            if worst_img is None:
                                worst_img = dict(x_adv=x_adv[:keep].clone(), s_adv=s_adv[:keep].clone(), source=[spec.name] * keep)
                            else:
                                worst_img["x_adv"][t] = x_adv[:keep][t]
                                worst_img["s_adv"][t] = s_adv[:keep][t]
                                worst_img["source"] = [spec.name if ti else s for ti, s in zip(t.tolist(), worst_img["source"])]
                    for metric, v in worst.items():
                        values[f"{metric}/{WORST}/{method}/{tag}"] = v.clone()
                if keep and worst_img is not None:
                    images[method] = dict(x=x[:keep].cpu(), s=s0[:keep].cpu(), x_adv=worst_img["x_adv"].cpu(),
                                          s_adv=worst_img["s_adv"].cpu(), source=worst_img["source"],
                                          ids=ids[:keep].cpu(), eps=self.eps[-1], label=y[:keep].cpu(),
                                          pred=pred0[:keep].cpu(), p_at_k=worst["p_at_k"][:keep].cpu())
        values = {k: v.detach().float().cpu() for k, v in values.items()}
        return EvaluationResult(values, ids.detach().cpu(), list(notes), images, seconds, y.detach().cpu())

    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None,
                 keep_images: int = 0, progress=None, should_stop: Callable[[], bool] | None = None,
                 on_batch: Callable[[EvaluationResult], None] | None = None) -> EvaluationResult:
        """Evaluate every batch: items ``(x, y, ids)``, ``(x, y, ids, mask)`` or objects with
        ``x, y, ids, mask`` attributes. ``progress(i, n_images_done)`` is called after each batch,
        ``on_batch(result)`` with each batch's result as soon as it is done (e.g. to write it:
        an interrupted evaluation keeps every finished batch), ``should_stop`` as in
        :meth:`evaluate_batch`."""
        with traces_reused():  # every attack's surrogate is resolved from one trace of the model
            return self._evaluate(model, batches, device, keep_images, progress, should_stop, on_batch)

    def _evaluate(self, model, batches, device, keep_images, progress, should_stop, on_batch) -> EvaluationResult:
        parts, done = [], 0
        params = next(iter(model.parameters()), None)
        dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
        for i, batch in enumerate(batches):
            if isinstance(batch, (tuple, list)):
                x, y, ids, mask = (*batch, None)[:4]
            else:
                x, y, ids, mask = batch.x, batch.y, batch.ids, batch.mask
            if device is not None:
                x, y, ids = x.to(device), y.to(device), ids.to(device)
                mask = None if mask is None else mask.to(device)
            x = x.to(dtype)
            parts.append(self.evaluate_batch(model, x, y, ids, mask, keep_images if i == 0 else 0, should_stop))
            if on_batch is not None:
                on_batch(parts[-1])
            done += int(x.shape[0])
            if progress is not None:
                progress(i, done)
        return EvaluationResult.cat(parts)


def iter_batches(x: Tensor, y: Tensor, ids: Tensor, batch_size: int, mask: Tensor | None = None):
    """(x, y, ids, mask) chunks of fixed tensors, e.g. a study's evaluation images."""
    for i in range(0, x.shape[0], max(1, int(batch_size))):
        yield x[i : i + batch_size], y[i : i + batch_size], ids[i : i + batch_size], (None if mask is None else mask[i : i + batch_size])
