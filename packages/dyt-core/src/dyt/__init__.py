"""dyt: Dynamic Tanh, ``weight * tanh(alpha * x) + bias``, a drop-in replacement for LayerNorm and
RMSNorm (Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", 2025).

Importing ``dyt`` needs only torch; the training harness lives in ``dyt.train`` (extra ``train``).
"""

from .alpha import alpha_init_for
from .backends import (
    BackendUnavailableError,
    auto_backend,
    available_backends,
    default_backend,
    select_backend,
    set_default_backend,
    use_backend,
)
from .baselines import apply_norm_free, residual_gate
from .convert import ConversionReport, classify_norm, convert_norms, iter_norms
from .functional import dyt, residual_dyt
from .inference import ScaledTanh, fold_dyt
from .modules import DyT, ResidualDyT
from .norms import ChannelsFirst, NoNorm, NormConfig, make_norm, norm_variant_overrides

__all__ = [
    "BackendUnavailableError",
    "ChannelsFirst",
    "ConversionReport",
    "DyT",
    "ResidualDyT",
    "ScaledTanh",
    "NoNorm",
    "NormConfig",
    "alpha_init_for",
    "apply_norm_free",
    "available_backends",
    "classify_norm",
    "convert_norms",
    "default_backend",
    "dyt",
    "fold_dyt",
    "iter_norms",
    "make_norm",
    "norm_variant_overrides",
    "residual_dyt",
    "residual_gate",
    "auto_backend",
    "select_backend",
    "set_default_backend",
    "use_backend",
]
__version__ = "0.1.0"
