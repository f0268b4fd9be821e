"""Look inside norm layers: the paper's input->output S-curves, and DyT's alpha against 1/std.

``NormRecorder`` hooks every norm layer (anything :func:`dyt.iter_norms` recognises) and keeps a
sample of (input, output before the per-channel affine) pairs, pooled over calls; ``plot_s_curves``
draws one panel per layer (matplotlib, extra ``analysis``). ``AlphaTracker`` records each DyT's alpha and the 1/std of its input over training:
the paper observes alpha tracking 1/std. The training harness keeps one on every run and logs
``alpha/<layer>`` and ``inv_std/<layer>`` at each logged step; ``plot_alpha_vs_scale`` draws the
paper's figure from those metrics (``alpha_scale_history``) or from a tracker's own history.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .convert import NormInfo, iter_norms
from .kernels.eager import SQUASH_FUNCTIONS
from .modules import DyT, ResidualDyT
from .norms import ChannelsFirst


def before_affine(module: nn.Module, info: NormInfo, x: torch.Tensor) -> torch.Tensor:
    """What norm ``module`` (classified as ``info``) computes from channels-last ``x`` before its
    per-channel weight and bias: the curve the paper's Fig. 2 plots (one curve for every channel, but
    for a DyT with an alpha per channel)."""
    if info.kind == "layernorm":
        return F.layer_norm(x, info.shape, eps=1e-5 if info.eps is None else info.eps)  # None: a probed one, matched at 1e-5
    if info.kind == "rmsnorm":
        return F.rms_norm(x, info.shape, eps=info.eps)  # None: the dtype's own, as nn.RMSNorm
    if info.kind == "dyt":
        layer = module.norm if isinstance(module, ChannelsFirst) else module
        return SQUASH_FUNCTIONS[layer.squash](layer.alpha.to(x.dtype) * x)
    return x  # identity: a removed norm has no affine


class NormRecorder:
    """Context manager recording a sample of each norm layer's (input, output before its affine)
    element pairs, pooled over every call made inside it.

    The output is recomputed from the input without the per-channel weight and bias
    (:func:`before_affine`), as the paper's Fig. 2 plots it: the layer's own S-curve, not each
    channel's rescaling of it. Each layer keeps at most ``max_points`` pairs: all of them while its
    calls so far held no more, then ``max_points`` slots each drawn uniformly (with replacement)
    from every element of every call, so a layer run on several batches is sampled across all of
    them. The indices are drawn on the activations' device (generators seeded with ``seed``) and
    only the sample is copied to the CPU. A module reached by several paths is hooked once, under
    its first path; an input given by keyword is found as well as a positional one.

    >>> with NormRecorder(model) as rec:
    ...     model(batch)
    >>> plot_s_curves(rec.records, "s_curves.png")
    """

    def __init__(self, model: nn.Module, max_points: int = 4096, seed: int = 0) -> None:
        if max_points < 1:
            raise ValueError(f"max_points must be at least 1, not {max_points}")
        self.model = model
        self.max_points = max_points
        self.seed = seed
        self.records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: dict[str, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._handles: list = []

    def __enter__(self) -> NormRecorder:
        hooked: set[int] = set()
        for path, module, info in iter_norms(self.model):
            if isinstance(info, NormInfo) and id(module) not in hooked:
                hooked.add(id(module))
                self._handles.append(module.register_forward_hook(self._hook(path, info), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def _hook(self, path: str, info: NormInfo):
        def record(module, args, kwargs, output):
            given = [*args, *kwargs.values()]  # the forward's input, by position or by name
            with torch.no_grad():
                x = given[0] if info.channels_last else given[0].movedim(1, -1)
                self._keep(path, x, before_affine(module, info, x))

        return record

    def _keep(self, path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Pool this call's pairs into ``path``'s sample: while everything seen fits, all of it; then
        each slot takes one of this call's elements with probability n / (seen + n), so every slot
        stays a uniform draw over all the elements seen."""
        n, seen, limit = x.numel(), self._seen.get(path, 0), self.max_points
        if n == 0:  # an empty batch, an expert given no token: nothing to pool
            return
        self._seen[path] = seen + n
        kept = self.records.get(path)
        if seen + n <= limit:
            pairs = (x.reshape(-1).to("cpu", torch.float32), y.reshape(-1).to("cpu", torch.float32))
            self.records[path] = pairs if kept is None else (torch.cat([kept[0], pairs[0]]), torch.cat([kept[1], pairs[1]]))
            return
        on_cpu = self._generator(torch.device("cpu"))
        from_this_call = torch.rand(limit, generator=on_cpu) < n / (seen + n)
        xs, ys = torch.empty(limit), torch.empty(limit)
        if kept is not None:  # slots already (seen > limit), or a uniform draw from all seen elements, all kept
            earlier = torch.arange(limit) if seen > limit else torch.randint(seen, (limit,), generator=on_cpu)
            xs, ys = kept[0][earlier], kept[1][earlier]
        index = torch.randint(n, (int(from_this_call.sum()),), generator=self._generator(x.device), device=x.device)
        xs[from_this_call] = torch.take(x, index).to("cpu", torch.float32)
        ys[from_this_call] = torch.take(y, index).to("cpu", torch.float32)
        self.records[path] = (xs, ys)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _thinned(names: list[str], max_panels: int) -> list[str]:
    """At most ``max_panels`` of ``names``, evenly spread from the first to the last (one: the first)."""
    if max_panels < 1:
        raise ValueError(f"max_panels must be at least 1, not {max_panels}")
    if len(names) <= max_panels:
        return names
    if max_panels == 1:
        return names[:1]
    step = (len(names) - 1) / (max_panels - 1)
    return [names[round(i * step)] for i in range(max_panels)]


def plot_s_curves(
    records: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, title: str = "", max_panels: int = 12
) -> Path:
    """One scatter panel (input vs output before the affine, as :class:`NormRecorder` records) per norm
    layer, in model order; evenly thinned to ``max_panels``. Writes a PNG and returns its path."""
    plt = pyplot()
    names = list(records)
    if not names:
        raise ValueError("no norm layers were recorded (did the model run inside NormRecorder?)")
    names = _thinned(names, max_panels)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        x, y = records[name]
        ax.scatter(x.numpy(), y.numpy(), s=1, alpha=0.3)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("input", fontsize=7)
        ax.set_ylabel("output before affine", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    return _save(fig, path, title)


def dyt_layers(model: nn.Module) -> Iterator[tuple[str, DyT]]:
    for path, module in model.named_modules():
        if isinstance(module, DyT):
            yield path, module


def alpha_value(layer: DyT, read: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """A DyT's alpha as one number: the scalar, or the mean of a per-channel alpha; ``read``: where
    the value lives other than in the parameter (a mixed-precision optimizer's fp32 master)."""
    alpha = layer.alpha if read is None else read(layer.alpha)
    return alpha.detach().float().mean().item()


@dataclass
class AlphaTracker:
    """Records, at each :meth:`record`, every DyT's alpha and the 1/std of its latest input.

    A forward pre-hook on each DyT measures 1/std of the input (all its elements) on training-mode
    forwards while ``armed`` (one reduction per DyT; the value stays on the device until read, so
    no synchronisation per forward). The trainer arms it for logged steps only. Hooks stay on the
    model until :meth:`close`.
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    armed: bool = True

    def __post_init__(self) -> None:
        self._inv_std: dict[str, torch.Tensor] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(path), with_kwargs=True)
            for path, module in dyt_layers(self.model)
        ]

    def _hook(self, path: str):
        def measure(module, args, kwargs):
            if self.armed and module.training:
                given = [*args, *kwargs.values()]  # the forward's tensors in order, by position or name
                with torch.no_grad():  # a ResidualDyT squashes the sum of its two inputs
                    squashed = given[0] + given[1] if isinstance(module, ResidualDyT) else given[0]
                    self._inv_std[path] = squashed.detach().float().std().reciprocal()

        return measure

    def parameters(self) -> list[nn.Parameter]:
        """Every DyT's alpha, for a caller that must gather them first (ZeRO-3)."""
        return [m.alpha for _, m in dyt_layers(self.model)]

    def alphas(self, read: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Every DyT's alpha (:func:`alpha_value`, with ``read``)."""
        return {p: alpha_value(m, read) for p, m in dyt_layers(self.model)}

    def inverse_stds(self) -> dict[str, float]:
        """1/std of each DyT's input at its latest measured forward (layers not measured yet are absent)."""
        return {p: t.item() for p, t in self._inv_std.items()}

    def metrics(self, read: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """``alpha/<layer>`` and ``inv_std/<layer>`` for a metrics row (alphas through ``read``)."""
        return {**{f"alpha/{p}": v for p, v in self.alphas(read).items()},
                **{f"inv_std/{p}": v for p, v in self.inverse_stds().items()}}

    def record(self, step: int) -> dict:
        row = {"step": step, "alpha": self.alphas(), "inv_std": self.inverse_stds()}
        self.history.append(row)
        return row

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def save(self, path: str | Path) -> None:
        Path(path).write_text("".join(json.dumps(row) + "\n" for row in self.history))

    def plot(self, path: str | Path, title: str = "DyT alpha vs 1/std of its input") -> Path:
        return plot_alpha_vs_scale(self.history, path, title)


def alpha_scale_history(rows: list[dict]) -> list[dict]:
    """A run's metrics rows (``metrics.jsonl``: ``step``, ``alpha/<layer>``, ``inv_std/<layer>``) as
    :class:`AlphaTracker` history rows, keeping the rows that carry alpha."""
    history = []
    for row in rows:
        alpha = {k.removeprefix("alpha/"): v for k, v in row.items() if k.startswith("alpha/")}
        if alpha:
            inv_std = {k.removeprefix("inv_std/"): v for k, v in row.items() if k.startswith("inv_std/")}
            history.append({"step": row["step"], "alpha": alpha, "inv_std": inv_std})
    return history


def plot_alpha_vs_scale(
    history: list[dict], path: str | Path, title: str = "DyT alpha vs 1/std of its input", max_panels: int = 12
) -> Path:
    """The paper's figure: one panel per DyT layer (evenly thinned to ``max_panels``) with alpha
    (left axis) and 1/std of the layer's input (right axis) over training steps, and a last panel
    of every layer's final alpha against its final 1/std. Writes a PNG and returns its path."""
    plt = pyplot()
    if not history:
        raise ValueError("nothing recorded: no rows with alpha (is there a DyT in the model?)")
    names = list(history[-1]["alpha"])
    names = _thinned(names, max_panels)
    cols = min(4, len(names) + 1)
    rows = math.ceil((len(names) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    panels = list(axes.flat)
    for ax, name in zip(panels, names):
        steps = [r["step"] for r in history if name in r["alpha"]]
        ax.plot(steps, [r["alpha"][name] for r in history if name in r["alpha"]], color="tab:blue")
        ax.set_ylabel("alpha", color="tab:blue", fontsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
        measured = [(r["step"], r["inv_std"][name]) for r in history if name in r.get("inv_std", {})]
        if measured:
            twin = ax.twinx()
            twin.plot(*zip(*measured), color="tab:orange", linestyle="--")
            twin.set_ylabel("1/std(input)", color="tab:orange", fontsize=7)
            twin.tick_params(labelsize=6)
            twin.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    final = panels[len(names)]
    last = history[-1]
    pairs = [(last["inv_std"][n], last["alpha"][n]) for n in last["alpha"] if n in last.get("inv_std", {})]
    if pairs:
        final.scatter(*zip(*pairs), s=10)
    final.set_title(f"every layer at step {last['step']}", fontsize=7)
    final.set_xlabel("1/std(input)", fontsize=7)
    final.set_ylabel("alpha", fontsize=7)
    final.tick_params(labelsize=6)
    for ax in panels[len(names) + 1 :]:
        ax.axis("off")
    return _save(fig, path, title)
