"""The stream ids of the counter-based random draws: one table.

Every per-sample random number of an attack or an evaluation is a pure function of (seed, stream,
sample id) (:func:`explanations.explainers.seeded_uniform`), so batches, DDP shards and the three
evaluation callers draw the same numbers for the same image. The stream keeps draws that must be
independent apart. Changing a value here changes every stored number that used it.

======================  =========================  ==========================================
stream                  constant                   draw
======================  =========================  ==========================================
r                       (the restart index)        start of attack restart r (ER, MSE)
500 + j                 ``NOISE_STREAM``           noise-baseline draw j (``UniformNoise``)
611                     ``PSE_TARGET_STREAM``      the PSE ``random`` target rule
1000 + d                ``THICKNESS_STREAM``       end point of thickness draw d
s + 1_000_003           ``L2_RADIUS_OFFSET``       radius of an l2 random start on stream s
======================  =========================  ==========================================

MSEAttack without a random start starts from a 1e-3 eps draw on stream 0. A normal draw on stream s
(:func:`explanations.explainers.seeded_normal`, the direction of an l2 random start) reads the
uniform streams 2s and 2s + 1. The ranges stay apart up to 500 restarts and 111 noise draws.
"""

from __future__ import annotations

NOISE_STREAM = 500
PSE_TARGET_STREAM = 611
THICKNESS_STREAM = 1000
L2_RADIUS_OFFSET = 1_000_003

__all__ = ["L2_RADIUS_OFFSET", "NOISE_STREAM", "PSE_TARGET_STREAM", "THICKNESS_STREAM"]
