"""Framework-free core: saliency, rankings, regularizers, objectives (plain torch, no Lightning)."""

from explanations.objectives import (
    OBJECTIVES,
    GradientNorm,
    Objective,
    ObjectiveOutput,
    ThicknessSurrogate,
    Vanilla,
    build_objective,
    register_objective,
)
from explanations.regularizers import (
    PAIR_SETS,
    adaptive_weight,
    curvature_term,
    frozen_batchnorm_stats,
    gap_term,
    grad_norm_term,
)
from explanations.saliency import (
    InputGradient,
    input_gradient,
    num_features,
    ranking,
    resolve_k,
    saliency,
    saliency_from_gradient,
    topk_indices,
    topk_mask,
)

__all__ = [
    "OBJECTIVES", "PAIR_SETS", "GradientNorm", "InputGradient", "Objective", "ObjectiveOutput",
    "ThicknessSurrogate", "Vanilla", "adaptive_weight", "build_objective", "curvature_term",
    "frozen_batchnorm_stats", "gap_term", "grad_norm_term", "input_gradient", "num_features",
    "ranking", "register_objective", "resolve_k", "saliency", "saliency_from_gradient",
    "topk_indices", "topk_mask",
]
