"""Framework-free core: saliency, rankings, regularizers, objectives, explanation methods,
ranking attacks and metrics (plain torch, no Lightning)."""

from explanations.adversarial_training import AdversarialTraining
from explanations.attacks import (
    ATTACKS,
    ERAttack,
    MSEAttack,
    PaperERAttack,
    RankingAttack,
    UniformNoise,
    build_attack,
    paper_attack,
    register_attack,
)
from explanations.explainers import (
    METHODS,
    eval_mode,
    explain,
    explain_unchecked,
    explain_with_logits,
    register_method,
    seeded_uniform,
)
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
    block_gap,
    curvature_term,
    frozen_batchnorm_stats,
    gap_term,
    grad_norm_term,
)
from explanations.ranking_metrics import (
    kept_pair_fraction,
    localization_share,
    precision_at_k,
    prediction_flips,
    rank_correlation,
    thickness_estimates,
    topk_thickness,
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

from explanations.validation import check_eps, check_images, check_steps

__all__ = [
    "ATTACKS", "check_eps", "check_images", "check_steps", "explain_unchecked", "METHODS", "AdversarialTraining", "ERAttack", "MSEAttack", "PaperERAttack",
    "RankingAttack", "UniformNoise", "block_gap", "build_attack", "paper_attack", "register_attack", "register_method",
    "thickness_estimates", "eval_mode", "explain", "explain_with_logits",
    "kept_pair_fraction", "localization_share", "precision_at_k", "prediction_flips",
    "rank_correlation", "seeded_uniform", "topk_thickness",
    "OBJECTIVES", "PAIR_SETS", "GradientNorm", "InputGradient", "Objective", "ObjectiveOutput",
    "ThicknessSurrogate", "Vanilla", "adaptive_weight", "build_objective", "curvature_term",
    "frozen_batchnorm_stats", "gap_term", "grad_norm_term", "input_gradient", "num_features",
    "ranking", "register_objective", "resolve_k", "saliency", "saliency_from_gradient",
    "topk_indices", "topk_mask",
]

# Promotion-suppression analysis (DESIGN §6): targeted PGD, CAM / Grad-CAM, PSE.
from explanations.cam import (  # noqa: E402
    CAM_METHODS,
    activation_maps,
    class_activation_map,
    default_cam_layer,
    energy_by_category,
    energy_share_in_region,
    grad_cam,
    top_region,
)
from explanations.pse import (  # noqa: E402
    CATEGORIES,
    PSE,
    PSEBatch,
    PSESettings,
    analyze_batch,
    batch_sums,
    categorize,
    group_pse,
    promotion_share,
    pse_from_logits,
    summarize,
    unit_activations,
    unit_changes,
)
from explanations.targeted_pgd import (  # noqa: E402
    NORMS,
    TARGET_RULES,
    TargetedAttack,
    choose_targets,
    cw_margin,
    targeted_pgd,
)

__all__ += [
    "CAM_METHODS", "CATEGORIES", "NORMS", "PSE", "PSEBatch", "PSESettings", "TARGET_RULES",
    "TargetedAttack", "activation_maps", "analyze_batch", "batch_sums", "categorize",
    "choose_targets", "class_activation_map", "cw_margin", "default_cam_layer",
    "energy_by_category", "energy_share_in_region", "grad_cam", "group_pse", "promotion_share",
    "pse_from_logits", "summarize", "targeted_pgd", "top_region", "unit_activations", "unit_changes",
]
