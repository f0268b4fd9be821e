"""Normalization-free baselines the paper compares DyT with, for any model built from dyt-core.

``model.norm.kind`` picks one; every norm layer is then removed (:class:`dyt.norms.NoNorm`). A
model supports them with two calls and no baseline-specific code:

* at each residual add ``x + branch(...)`` it writes ``x + gate(branch(...))``, with
  ``gate = residual_gate(norm_config, branch, output)`` built next to the branch (``output``: the
  branch's last projection). The gate is ``nn.Identity`` for every kind but SkipInit and Fixup;
* once the whole model is built (after its own initialisation), ``apply_norm_free(model, norm_config)``
  does the model-level part (Fixup's initialisation, sigmaReparam's reparametrisation); a no-op for
  the other kinds.

The baselines (what is implemented, and where it departs from the papers):

* ``skipinit`` (De & Smith, 2020): a learnable scalar on each residual branch, initialised to 0,
  so every block starts as the identity: ``x + g * branch(x)``.
* ``fixup`` (Zhang, Dauphin & Ma, 2019), its rules 1-3 on residual branches: each branch's output
  projection is initialised to 0 (weight and bias); the branch's other layers (by default every
  other linear layer in it; a model may name them) are scaled by ``L ** (-1 / (2m - 2))`` with ``L``
  the number of residual branches and ``m`` the weight layers the branch's output is a product of
  (2 for layers in series, i.e. ``L ** -0.5``; 3 for a gated MLP, whose two gated layers each get
  ``L ** -0.25``, so that their product shrinks as one layer of a two-layer branch would);
  each branch gets a scalar multiplier (init 1) and a scalar bias (init 0) on its output. Fixup's
  scalar biases before every inner layer and its zero-initialised classifier are not added (a
  language-model head tied to the embedding cannot start at 0), so this is "Fixup-style".
* ``sigma-reparam`` (Zhai et al., 2023, "Stabilizing Transformer Training by Preventing Attention
  Entropy Collapse"): every linear layer's weight (:func:`is_linear`) becomes ``gamma / sigma(W) * W``, ``sigma(W)``
  estimated by one power-iteration step per forward from a persistent vector ``u`` (initialised
  to W's top right singular vector by an SVD, so the first estimate is exact; updated in training
  mode only), with a learnable scalar ``gamma`` initialised to ``sigma(W0)`` so the model starts
  as built, as the authors' code does. Norm layers are removed, as in their normalization-free
  runs. Convolutions and embeddings are left as they are. Within one forward of the model each
  reparametrised weight is computed once (``parametrize.cached`` around the model's forward), so
  a layer used twice (Caduceus' shared projections, its two RCPS halves) sees one sigma and the
  power iteration takes one step per forward, as in the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .norms import NormConfig

FIXUP_BRANCH_DEPTH = 2
"""Fixup's m for a branch of two weight layers in series (an MLP; attention's value and output
projections): the scale of the inner layers is L ** (-1 / (2m - 2))."""


class SkipInitGate(nn.Module):
    """``gain * branch``: SkipInit's learnable scalar, initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.to(x.dtype)


class FixupGate(nn.Module):
    """``scale * branch + shift`` (Fixup's scalar multiplier, init 1, and scalar bias, init 0). It
    also remembers its branch and the branch's output projection, not as submodules (they belong
    to the model), for :func:`apply_norm_free`'s initialisation."""

    def __init__(self, branch: nn.Module, output: nn.Module, scaled: tuple[nn.Module, ...] | None = None,
                 depth: int = FIXUP_BRANCH_DEPTH) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.shift = nn.Parameter(torch.zeros(1))
        # a tuple: the modules are not registered here, so not listed twice
        self._fixup_spec = (branch, output, scaled, depth)

    def scaled_layers(self) -> list[nn.Module]:
        """The branch's layers Fixup scales: those given, else every linear layer but the output."""
        branch, output, scaled, _ = self._fixup_spec
        if scaled is not None:
            return list(scaled)
        return [layer for layer in branch.modules() if is_linear(layer) and layer is not output]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or another library's projection with the same interface (a 2-D ``weight``
    parameter and ``input_dim`` / ``output_dim``: fairseq2's Linear and its sharded forms)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(weight, nn.Parameter) and weight.ndim == 2
            and hasattr(module, "input_dim") and hasattr(module, "output_dim"))


def residual_gate(config: NormConfig, branch: nn.Module, output: nn.Module,
                  scaled: tuple[nn.Module, ...] | None = None, depth: int = FIXUP_BRANCH_DEPTH) -> nn.Module:
    """The module a model applies to a residual branch's output before the residual add:
    SkipInit's zero-initialised scalar, Fixup's scalar multiplier and bias, else ``nn.Identity``.

    ``branch`` is the residual branch and ``output`` its last projection (a linear layer inside it,
    see :func:`is_linear`), which Fixup initialises to zero. Fixup scales the branch's other layers
    (``scaled``; default: every other linear layer of the branch) by ``L ** (-1 / (2 depth - 2))``,
    ``depth`` being the weight layers the branch's output is a product of, the output included:
    2 for layers in series; 3 for a gated MLP (SwiGLU: w2 (silu(w1 x) * w3 x), where w1 and w3 each
    get ``L^-1/4``, so that their product shrinks by ``L^-1/2`` as one layer of a two-layer branch).
    """
    if config.kind == "skipinit":
        return SkipInitGate()
    if config.kind == "fixup":
        inside = list(branch.modules())
        if not any(m is output for m in inside):
            raise ValueError("residual_gate: the output projection must be a module of the branch")
        if scaled is not None and not all(any(m is layer for m in inside) for layer in scaled):
            raise ValueError("residual_gate: every scaled layer must be a module of the branch")
        if depth < 2:
            raise ValueError(f"residual_gate: a branch's depth is at least 2 (an inner layer and the output); got {depth}")
        return FixupGate(branch, output, scaled, depth)
    return nn.Identity()


class SigmaReparam(nn.Module):
    """A parametrization ``W -> gamma / sigma(W) * W`` (sigmaReparam), for
    ``torch.nn.utils.parametrize.register_parametrization``.

    ``sigma(W)`` is ``v^T W u`` after one power-iteration step from the stored ``u`` (gradient flows
    through ``W`` only, as in the authors' code); in training mode the new ``u`` is stored. The
    iteration runs in float32 whatever the weight's dtype.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        with torch.no_grad():
            _, singular, vh = torch.linalg.svd(weight.detach().float().reshape(weight.shape[0], -1), full_matrices=False)
        self.register_buffer("u", vh[0].clone())
        self.gamma = nn.Parameter(singular[:1].to(weight.dtype).clone())

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float().reshape(weight.shape[0], -1)
        with torch.no_grad():
            v = F.normalize(w @ self.u.float(), dim=0)
            u = F.normalize(w.T @ v, dim=0)
            if self.training:
                self.u.copy_(u)
        return v @ w @ u

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() * (self.gamma.float() / self.sigma(weight))).to(weight.dtype)


class _OneWeightPerForward:
    """Forward hooks that hold ``parametrize.cached()`` open for one forward of the model."""

    def __init__(self) -> None:
        self._open: list = []

    def enter(self, module, args) -> None:
        context = parametrize.cached()
        context.__enter__()
        self._open.append(context)

    def exit(self, module, args, output) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)


def _fixup_init(model: nn.Module) -> int:
    gates = [m for m in model.modules() if isinstance(m, FixupGate)]
    if not gates:
        raise ValueError("model.norm.kind=fixup, but the model has no residual gates (residual_gate) to initialise")
    with torch.no_grad():
        for gate in gates:
            _, output, _, depth = gate._fixup_spec
            for layer in gate.scaled_layers():
                layer.weight.mul_(len(gates) ** (-1.0 / (2 * depth - 2)))
            output.weight.zero_()
            if getattr(output, "bias", None) is not None:
                output.bias.zero_()
    return len(gates)


def _sigma_reparam(model: nn.Module) -> None:
    linears = [m for m in model.modules() if is_linear(m) and not parametrize.is_parametrized(m)]
    if not linears:
        raise ValueError("model.norm.kind=sigma-reparam, but the model has no linear layers")
    for linear in linears:
        parametrize.register_parametrization(linear, "weight", SigmaReparam(linear.weight))
    hooks = _OneWeightPerForward()
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.exit, always_call=True)


_REWRITES_BUILT_MODEL = {"fixup": _fixup_init, "sigma-reparam": _sigma_reparam}


def rewrites_built_model(config: NormConfig) -> bool:
    """Whether :func:`apply_norm_free` changes the built model for this kind (so it needs the model
    whole: not built shard by shard under ZeRO-3)."""
    return config.kind in _REWRITES_BUILT_MODEL


def apply_norm_free(model: nn.Module, config: NormConfig) -> nn.Module:
    """The model-level part of a normalization-free baseline, in place, once the model is built and
    initialised: Fixup's initialisation of the residual branches (``fixup``), or sigmaReparam on every
    linear layer (``sigma-reparam``). Any other kind: nothing. Returns ``model``."""
    if rewrites_built_model(config):
        _REWRITES_BUILT_MODEL[config.kind](model)
    return model


def sigma_reparam_layers(model: nn.Module) -> list[tuple[str, SigmaReparam]]:
    """Every sigmaReparam parametrization of ``model`` with its module path (for inspection)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, SigmaReparam)]
