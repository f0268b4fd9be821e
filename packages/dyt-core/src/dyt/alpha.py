"""The paper's alpha initialisation (alpha0) policy."""

from __future__ import annotations

import math
import numbers

ROLES = ("attention", "ffn", "final", "input", "default")
"""Where a DyT sits: LLM blocks' attention / ffn / final norms (the paper's table), ``input`` (the norm
over a model's raw input features, e.g. wav2vec 2.0's post-extraction norm, whose input scale is set
by a feature extractor, not by the residual stream) and ``default`` (anything else)."""

# Zhu et al., "Transformers without Normalization" (2025), LLaMA alpha0 table: model width ->
# (alpha0 of the attention norms, alpha0 of the other norms: FFN and final). 5120 is the paper's
# LLaMA-13B setting (0.6 / 0.15). Non-LLM models use 0.5 for every DyT (the paper's default).
LLM_ALPHA_TABLE: dict[int, tuple[float, float]] = {
    1024: (1.0, 1.0),
    2048: (1.0, 0.5),
    4096: (0.8, 0.2),
    5120: (0.6, 0.15),
    8192: (0.2, 0.05),
}
DEFAULT_ALPHA = 0.5


def positive_number(value: object) -> bool:
    """``value`` is a finite number above 0: an int or float, numpy's scalars too (an alpha0 taken from
    an array), not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def alpha_init_for(width: int, role: str) -> float:
    """alpha0 for a DyT of model width ``width`` in role ``attention`` / ``ffn`` / ``final``
    (LLM blocks, the paper's table; widths between rows take the next larger row, widths above
    8192 the 8192 row), or ``input`` / ``default`` (0.5, the paper's default; a recipe overrides
    them through ``NormConfig.alpha_init``).

    Source: Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization" (CVPR 2025), the
    LLaMA alpha0 table: <=1024 -> 1.0/1.0, 2048 -> 1.0/0.5, 4096 -> 0.8/0.2, 5120 -> 0.6/0.15,
    8192 -> 0.2/0.05 (attention / other).
    """
    if role not in ROLES:
        raise ValueError(f"unknown DyT role {role!r}; roles are {', '.join(ROLES)}")
    if role in ("input", "default"):
        return DEFAULT_ALPHA
    if width <= 0:
        raise ValueError(f"model width must be positive, got {width}")
    row = next((w for w in sorted(LLM_ALPHA_TABLE) if width <= w), max(LLM_ALPHA_TABLE))
    attention, other = LLM_ALPHA_TABLE[row]
    return attention if role == "attention" else other
