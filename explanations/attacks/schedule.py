"""APGD's step-size schedule (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"; fra31/auto-attack ``autopgd_base.py``).

For a budget of T steps: the step size starts at ``2 * eps``; checkpoints come after periods of
``max(int(0.22 T), 1)`` steps, each next period ``max(int(0.03 T), 1)`` shorter but at least
``max(int(0.06 T), 1)``. At a checkpoint a sample halves its step size and restarts from its best
point when

- the objective increased in at most ``rho`` (0.75) of the steps of the period just ended, or
- its step size was not reduced at the previous checkpoint and its best value has not changed
  since then.

Between checkpoints the update has momentum ``alpha`` (0.75):
``z = P(x_t + eta * dir(g_t))``, ``x_{t+1} = P(x_t + alpha (z - x_t) + (1 - alpha)(x_t - x_{t-1}))``
(no momentum on the first step and right after a restart from the best point).
"""

from __future__ import annotations

#: APGD's constants: first period share, period decrease, minimal period, rho, momentum alpha.
P_FIRST, P_DECREASE, P_MIN = 0.22, 0.03, 0.06
RHO, ALPHA = 0.75, 0.75


def apgd_checkpoints(steps: int) -> list[tuple[int, int]]:
    """[(step count after which a checkpoint falls, length of the period it closes)], for T steps.

    Examples:
        >>> apgd_checkpoints(10)
        [(2, 2), (3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 1), (10, 1)]
        >>> [t for t, _ in apgd_checkpoints(100)]
        [22, 41, 57, 70, 80, 87, 93, 99]
    """
    period = max(int(P_FIRST * steps), 1)
    decrease, minimum = max(int(P_DECREASE * steps), 1), max(int(P_MIN * steps), 1)
    out, t = [], period
    while t <= steps:
        out.append((t, period))
        period = max(period - decrease, minimum)
        t += period
    return out
