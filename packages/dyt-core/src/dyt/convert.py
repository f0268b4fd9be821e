"""Swap every norm layer of any model between LayerNorm, RMSNorm, DyT and identity, in place.

Recognised: ``nn.LayerNorm``, ``nn.RMSNorm``, :class:`~dyt.DyT`, :class:`~dyt.norms.ChannelsFirst`,
:class:`~dyt.norms.NoNorm` (a removed norm, kind ``identity``),
and norm-like modules of other libraries (a weight plus an ``eps``/``variance_epsilon``, or a class
name with "Norm": HF's ``LlamaRMSNorm``, fairseq2's ``RMSNorm``/``StandardLayerNorm``, torchaudio's
channels-first ``LayerNorm``). Those are identified by *probing*: the module runs on a small input,
channels-last then channels-first, and its output is compared with the LayerNorm and RMSNorm
formulas. So a module is only replaced by something that computes the same kind of normalisation;
anything else norm-like (BatchNorm, GroupNorm, an RMSNorm with ``1 + weight`` scaling, ...) is left
alone and listed in the report with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .modules import DyT, ResidualDyT
from .norms import KINDS, ChannelsFirst, NoNorm, NormConfig, make_norm


@dataclass(frozen=True)
class NormInfo:
    """What a norm layer computes, as far as conversion needs to know."""

    kind: str  # layernorm | rmsnorm | dyt | identity (a NoNorm)
    shape: tuple[int, ...]
    channels_last: bool
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    device: torch.device | None
    """None for a layer holding no floating-point tensor (a norm without affine): it goes where its
    parent's tensors are (:func:`convert_norms`)."""
    dtype: torch.dtype | None
    eps: float | None = None
    """The LayerNorm/RMSNorm epsilon, kept by a conversion to a bare kind (None: DyT or identity, or
    an RMSNorm using its dtype's own)."""


@dataclass(frozen=True)
class Replacement:
    path: str
    old_type: str
    new_type: str
    shape: tuple[int, ...]
    channels_last: bool
    affine_copied: bool
    """The old layer had a weight or bias and the new one took every one it had: False without
    ``copy_affine``, and where the target keeps less (a DyT without bias for a LayerNorm, identity)."""


@dataclass(frozen=True)
class LeftAlone:
    path: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_norms` replaced, where, and what norm-like modules it left alone."""

    target: str
    replaced: list[Replacement] = field(default_factory=list)
    left_alone: list[LeftAlone] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many modules of each original type were replaced."""
        counts: dict[str, int] = {}
        for r in self.replaced:
            counts[r.old_type] = counts.get(r.old_type, 0) + 1
        return counts

    def __str__(self) -> str:
        by_type = ", ".join(f"{n} x {t}" for t, n in sorted(self.counts().items())) or "nothing"
        lines = [f"convert_norms -> {self.target}: replaced {len(self.replaced)} ({by_type})"]
        for r in self.replaced:
            layout = "" if r.channels_last else " [channels-first]"
            lines.append(f"  {r.path}: {r.old_type} -> {r.new_type} {r.shape}{layout}")
        if self.left_alone:
            lines.append(f"left alone: {len(self.left_alone)}")
            lines += [f"  {a.path}: {a.type} ({a.reason})" for a in self.left_alone]
        return "\n".join(lines)


_NOT_PER_TOKEN = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LocalResponseNorm)


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _affine(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        weight if isinstance(weight, torch.Tensor) else None,
        bias if isinstance(bias, torch.Tensor) else None,
    )


def _placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype of the module's first floating-point tensor; (None, None) without one."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _eps(module: nn.Module) -> float | None:
    return next((float(v) for a in ("eps", "variance_epsilon")
                 if isinstance(v := getattr(module, a, None), float | int) and not isinstance(v, bool)), None)


def _info(module: nn.Module, kind: str, shape, channels_last: bool) -> NormInfo:
    weight, bias = _affine(module)
    device, dtype = _placement(module)
    eps = _eps(module) if kind in ("layernorm", "rmsnorm") else None
    return NormInfo(kind, tuple(shape), channels_last, weight, bias, device, dtype, eps)


def _probe_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of a module on the meta device (which holds no values to run), its parameters drawn
    at random away from zero: what the probe runs where the original cannot."""
    clone = copy.deepcopy(module).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in (*clone.parameters(), *clone.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
    return clone


PROBE_MAX_ELEMENTS = 2**20
"""A norm-like module holding more than this many parameter and buffer elements is no norm layer
(one over even 65536 channels holds 131072): it is not copied to be probed."""
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


def _quiet_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` to run for the probe, its hooks taken off: probing the module itself
    changed its state (a running statistic, a step count) and fired the user's hooks on the probe's
    input."""
    # each hook table copied as an empty one: the hooks themselves (a method of an object holding a
    # lock or a file, of the whole model) are never copied
    memo = {id(hooks): type(hooks)() for part in module.modules() for name in _HOOKS
            if isinstance(hooks := getattr(part, name, None), dict)}
    return copy.deepcopy(module, memo)


WRAPPERS = frozenset({"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"})
"""Classes (by name: their packages need not be importable here) that take a model's parameters when
they wrap it, so that a layer put in after wrapping is not synchronised, sharded or optimised."""


def _is_exact(module: nn.Module, cls: type) -> bool:
    """An instance of ``cls`` whose forward is ``cls``'s own (subclasses may change the layout)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _looks_norm_like(module: nn.Module, cls: type | None = None) -> bool:
    """An epsilon, or "norm" in the name of its class (``cls``, else the module's own)."""
    cls = cls or type(module)
    if cls.__module__.startswith("torch.nn.utils.parametriz"):
        return False  # weight-norm parametrizations reshape weights, not activations
    has_eps = any(isinstance(getattr(module, a, None), float) for a in ("eps", "variance_epsilon"))
    return has_eps or "norm" in cls.__name__.lower()


def _reference(kind: str, x: torch.Tensor, eps: float, weight, bias) -> torch.Tensor:
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _probe(module: nn.Module) -> NormInfo | str:
    """Identify an unknown norm-like module by running it (a module on the meta device: a CPU copy
    of it), channels-last, then channels-first on 3-D and on 4-D input (an image model's
    ``LayerNorm2d``); a string says why it was not."""
    device, dtype = _placement(module)
    if (size := sum(t.numel() for t in (*module.parameters(), *module.buffers()))) > PROBE_MAX_ELEMENTS:
        return f"holds {size} parameter and buffer elements, more than a norm layer's"
    if device is not None and device.type == "meta":
        runs = _probe_copy(module)
        device = torch.device("cpu")
    else:
        try:
            runs = _quiet_copy(module)
        except Exception as error:  # noqa: BLE001 - whatever a module's own __deepcopy__ raises
            return f"cannot be copied to be probed ({type(error).__name__}: {error})"
    weight, bias = _affine(runs)
    shape = getattr(module, "normalized_shape", None)
    shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
    if weight is not None and weight.ndim == 1 and (weight.shape[0] != 1 or shape == (1,)):
        channels = weight.shape[0]
    elif weight is not None and weight.numel() == 1:
        return "its weight is one number, not one per channel (a ScaleNorm's gain?), and DyT's is per channel"
    else:
        if len(shape) != 1:
            return "cannot tell its channel count (no 1-D weight or normalized_shape)"
        channels = shape[0]
    if bias is not None and bias.shape != (channels,):
        return f"bias of shape {tuple(bias.shape)} is not per-channel"
    eps = _eps(module)
    eps = 1e-5 if eps is None else eps
    dtype = dtype or torch.get_default_dtype()
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, channels, generator=generator) * 2 + 0.7).to(device or "cpu")
    images = (torch.randn(2, 3, 3, channels, generator=generator) * 2 + 0.7).to(device or "cpu")
    for given, channels_last in ((x, True), (x, False), (images, False)):
        probe_in = given if channels_last else given.movedim(-1, 1)
        try:
            with torch.no_grad():
                out = runs.forward(probe_in.to(dtype))  # forward, not __call__: no global hooks either
        except Exception:  # noqa: BLE001 - a failed probe just means "not this layout"
            continue
        if not isinstance(out, torch.Tensor) or out.shape != probe_in.shape:
            continue
        out = (out if channels_last else out.movedim(1, -1)).float()
        for kind in ("layernorm", "rmsnorm"):
            if torch.allclose(out, _reference(kind, given, eps, weight, bias), rtol=tol, atol=tol):
                return _info(module, kind, (channels,), channels_last)
    return ("its output matches neither LayerNorm nor RMSNorm (probed channels-last, and channels-first on 3-D "
            "and 4-D input)")


def classify_norm(module: nn.Module) -> NormInfo | str | None:
    """NormInfo for a convertible norm layer, a reason string for a norm-like module that is not
    convertible, None for anything else."""
    if parametrize.is_parametrized(module):
        original = type(module).__bases__[0]  # the class register_parametrization put its own over
        if issubclass(original, (nn.LayerNorm, nn.RMSNorm, DyT, NoNorm)) or _looks_norm_like(module, original):
            return ("a parameter of it is parametrized (torch.nn.utils.parametrize), which a new layer would not keep: "
                    "convert before parametrizing, or remove the parametrization first")
        return None
    if isinstance(module, ResidualDyT):
        return ("a residual add fused with DyT (two inputs, two outputs): no one-input norm stands in for it; "
                "change the model's code instead")
    if isinstance(module, DyT):
        return _info(module, "dyt", module.normalized_shape, module.channels_last)
    if isinstance(module, NoNorm):
        return _info(module, "identity", module.normalized_shape, module.channels_last)
    if isinstance(module, ChannelsFirst):
        inner = classify_norm(module.norm)
        if isinstance(inner, NormInfo) and inner.channels_last:
            return dataclasses.replace(inner, channels_last=False)
        return inner
    if _is_exact(module, nn.LayerNorm):
        return _info(module, "layernorm", module.normalized_shape, True)
    if _is_exact(module, nn.RMSNorm):
        return _info(module, "rmsnorm", module.normalized_shape, True)
    if isinstance(module, _NOT_PER_TOKEN):
        return "normalises over the batch or groups of channels, not per token"
    if _looks_norm_like(module):
        return _probe(module)
    return None


def iter_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module, NormInfo | str]]:
    """Every norm-like submodule (path, module, classification), outermost first; the insides of
    a recognised norm (e.g. a ChannelsFirst's inner LayerNorm) are not listed again."""
    inside: list[str] = []
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path.startswith(p + ".") for p in inside):
            continue
        found = classify_norm(module)
        if found is None:
            continue
        if isinstance(found, NormInfo):
            inside.append(path)
        yield path, module, found


def _ancestor_placement(model: nn.Module, path: str) -> tuple[torch.device | None, torch.dtype | None]:
    """The placement of the nearest module above ``path`` that holds a floating-point tensor (its
    submodules' included); (None, None) where none does."""
    while path:
        path = path.rpartition(".")[0]
        device, dtype = _placement(model.get_submodule(path))
        if device is not None:
            return device, dtype
    return None, None


def _affine_pairs(info: NormInfo, new: nn.Module) -> list[tuple[torch.Tensor, nn.Parameter]]:
    """(old, new) for each of weight and bias that both the old layer and ``new`` have."""
    inner = new.norm if isinstance(new, ChannelsFirst) else new
    return [(old, getattr(inner, name)) for name, old in (("weight", info.weight), ("bias", info.bias))
            if old is not None and getattr(inner, name, None) is not None]


def build_norm(info: NormInfo, target: NormConfig, *, copy_affine: bool = True, role: str = "default") -> nn.Module:
    """The ``target`` layer, built by :func:`make_norm` (the one norm builder), that stands where a
    layer described by ``info`` stood: same shape, layout, device and dtype (a layer holding no
    tensor: CPU and the default dtype, unless :func:`convert_norms` placed it); bias, eps and alpha0
    as ``target`` says. The original's weight (and bias, where both have one) are copied over, each
    with its ``requires_grad`` (a frozen norm stays frozen); what the new layer adds (alpha, a bias
    the old lacked) is trainable."""
    new = make_norm(target, info.shape, role=role, channels_last=info.channels_last, device=info.device, dtype=info.dtype)
    if copy_affine:
        with torch.no_grad():
            for old, param in _affine_pairs(info, new):
                param.copy_(old.reshape(param.shape))
                if isinstance(old, nn.Parameter):
                    param.requires_grad_(old.requires_grad)
    return new


def convert_norms(
    model: nn.Module,
    to: NormConfig | str = "dyt",
    *,
    copy_affine: bool = True,
    role_of: Callable[[str], str] | None = None,
    only: Callable[[str], bool] | None = None,
) -> ConversionReport:
    """Replace every norm module of ``model`` (``nn.LayerNorm``, ``nn.RMSNorm``, DyT, and other libraries'
    LayerNorm/RMSNorm modules, found by probing) with a ``to`` layer, in place. A norm computed by a
    function inside a forward (``F.layer_norm``, ``F.rms_norm``) is no module and is not seen: a model
    where no norm module is found gets a warning saying so. Each new layer takes the old one's
    training mode.

    torch's ``nn.TransformerEncoderLayer`` (and so ``nn.TransformerEncoder``) with ``batch_first=True``
    reads ``norm1.eps`` in eval mode to decide on its fast path, and that path runs LayerNorm from
    ``norm1.weight`` / ``.bias`` itself: after conversion such a layer raises ``AttributeError: 'DyT'
    object has no attribute 'eps'`` in eval mode; ``torch.backends.mha.set_fastpath_enabled(False)``
    runs it through its modules.

    Args:
        to: a NormConfig, whose settings (bias, eps, alpha0, backend) every new layer takes; or a
            bare kind (``dyt``, ``layernorm``, ``rmsnorm``, ``identity``): NormConfig's defaults,
            except that each new layer has a bias exactly when the layer it replaces had one. A
            baseline kind (``skipinit``, ``fixup``, ``sigma-reparam``) only removes the norms here;
            a bare ``layernorm`` / ``rmsnorm`` also keeps the epsilon of a LayerNorm or RMSNorm it
            replaces;
            its residual gates and weight changes come with building the model (:mod:`dyt.baselines`).
        copy_affine: carry the per-channel weight (and bias) over to the new layer.
        role_of: maps a module path to a DyT role (attention / ffn / final / input / default) for the
            alpha0 policy; default: every layer is ``default``. A ``to`` with ``alpha_policy="llm"``
            needs it (that policy sets alpha0 by role: without roles every layer would get the
            default 0.5).
        only: converts just the layers whose path it accepts (e.g. the paper's wav2vec 2.0 scope,
            everything but the conv feature extractor); the rest are reported as left alone.

    Returns a :class:`ConversionReport`. Layers already of the target kind stay as they are. A layer
    that cannot be converted raises before any is replaced: the model is converted whole or not at all.
    A model already wrapped (:data:`WRAPPERS`: DDP, FSDP, a DeepSpeed engine) is refused: convert, then
    wrap. Hooks of a replaced layer stay on it, and a warning names such layers.
    """
    keep_bias = isinstance(to, str)
    if not (keep_bias or isinstance(to, NormConfig)):
        raise TypeError(f"convert_norms converts to a NormConfig or a norm kind, not {to!r}")
    target = NormConfig(kind=to) if keep_bias else to
    if target.kind not in KINDS:
        raise ValueError(f"unknown norm kind {target.kind!r}; choose one of {', '.join(KINDS)}")
    if target.layer_kind == "dyt" and target.alpha_policy == "llm" and role_of is None and "default" not in target.alpha_init:
        raise ValueError("alpha_policy 'llm' sets alpha0 by each layer's role: give convert_norms a role_of "
                         "(path -> attention / ffn / final / input / default), e.g. a recipe's SPEC.role_of")
    if wrapped := next(((path, cls.__name__) for path, part in model.named_modules() for cls in type(part).__mro__
                        if cls.__name__ in WRAPPERS), None):
        raise ValueError(f"convert_norms: {wrapped[0] or 'the model'} is a {wrapped[1]}, which has taken the model's "
                         "parameters to synchronise, shard or optimise: a new layer's would train on each rank alone; "
                         "convert the norms first, then wrap the model")
    report = ConversionReport(target=target.kind)
    hooked: list[str] = []  # replaced layers with hooks of their own, which the new layers do not get
    swapped: dict[int, nn.Module] = {}
    placed: list[tuple[str, str, nn.Module]] = []  # (parent path, name, new layer): placed once all are built
    any_norm_module = False
    for path, module, found in list(iter_norms(model)):
        if isinstance(found, str):
            report.left_alone.append(LeftAlone(path, _type_name(module), found))
            continue
        any_norm_module = True
        if only is not None and not only(path):
            report.left_alone.append(LeftAlone(path, _type_name(module), "outside the requested scope"))
            continue
        if found.kind == target.layer_kind:
            report.left_alone.append(LeftAlone(path, _type_name(module), f"already {target.layer_kind}"))
            continue
        if not path:
            raise ValueError("convert_norms replaces submodules; the model itself is a norm layer")
        if id(module) not in swapped:
            role = role_of(path) if role_of is not None else "default"
            layer_target = target
            if keep_bias:
                kept_eps = found.eps is not None and target.kind in ("layernorm", "rmsnorm")
                layer_target = dataclasses.replace(target, bias=found.bias is not None,
                                                   **({"eps": found.eps} if kept_eps else {}))
            if found.device is None:  # no tensor of its own: where its nearest ancestor's are
                found = dataclasses.replace(found, **dict(zip(("device", "dtype"), _ancestor_placement(model, path))))
            swapped[id(module)] = build_norm(found, layer_target, copy_affine=copy_affine, role=role).train(module.training)
        new = swapped[id(module)]
        if any(getattr(module, hooks, None) for hooks in _HOOKS):
            hooked.append(path)
        parent_path, _, name = path.rpartition(".")
        placed.append((parent_path, name, new))
        affine_had = (found.weight is not None) + (found.bias is not None)
        affine_copied = copy_affine and affine_had > 0 and len(_affine_pairs(found, new)) == affine_had
        report.replaced.append(
            Replacement(path, _type_name(module), _type_name(new), found.shape, found.channels_last, affine_copied)
        )
    # only now, so that a layer refused midway (an unknown role, a shape DyT cannot take) leaves the
    # model as it was instead of half converted
    for parent_path, name, new in placed:
        setattr(model.get_submodule(parent_path), name, new)
    if hooked:
        warnings.warn(f"convert_norms: {', '.join(hooked)} had hooks of their own (forward or backward), which stay "
                      "on the layers replaced, not on the new ones: register them again on the new layers", stacklevel=2)
    if not any_norm_module:
        warnings.warn("convert_norms replaced nothing: the model has no LayerNorm / RMSNorm / DyT module to convert "
                      "(a norm computed by a function in a forward, F.layer_norm or F.rms_norm, is no module and is "
                      "not converted)", stacklevel=2)
    return report
