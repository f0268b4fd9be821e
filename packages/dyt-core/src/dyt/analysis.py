"""Look inside norm layers: the paper's input->output S-curves, and DyT's alpha against 1/std.

``NormRecorder`` hooks every norm layer (anything :func:`dyt.iter_norms` recognises) and keeps a
sample of (input, output) pairs; ``plot_s_curves`` draws one panel per layer (matplotlib, extra
``analysis``). ``AlphaTracker`` records each DyT's alpha and the 1/std of its input over training:
the paper observes alpha tracking 1/std.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .convert import NormInfo, iter_norms
from .modules import DyT


def _channels_last_flat(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return (t if channels_last else t.movedim(1, -1)).detach().float().reshape(-1)


class NormRecorder:
    """Context manager recording a sample of each norm layer's (input, output) elements.

    >>> with NormRecorder(model) as rec:
    ...     model(batch)
    >>> plot_s_curves(rec.records, "s_curves.png")
    """

    def __init__(self, model: nn.Module, max_points: int = 4096, seed: int = 0) -> None:
        self.model = model
        self.max_points = max_points
        self.generator = torch.Generator().manual_seed(seed)
        self.records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> NormRecorder:
        for path, module, info in iter_norms(self.model):
            if isinstance(info, NormInfo):
                self._handles.append(module.register_forward_hook(self._hook(path, info.channels_last)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, path: str, channels_last: bool):
        def record(module, inputs, output):
            x = _channels_last_flat(inputs[0], channels_last).cpu()
            y = _channels_last_flat(output, channels_last).cpu()
            if x.numel() > self.max_points:
                keep = torch.randperm(x.numel(), generator=self.generator)[: self.max_points]
                x, y = x[keep], y[keep]
            self.records[path] = (x, y)

        return record


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


def plot_s_curves(
    records: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, title: str = "", max_panels: int = 12
) -> Path:
    """One scatter panel (input vs output) per norm layer, in model order; evenly thinned to
    ``max_panels``. Writes a PNG and returns its path."""
    plt = pyplot()
    names = list(records)
    if not names:
        raise ValueError("no norm layers were recorded (did the model run inside NormRecorder?)")
    if len(names) > max_panels:
        step = (len(names) - 1) / (max_panels - 1)
        names = [names[round(i * step)] for i in range(max_panels)]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        x, y = records[name]
        ax.scatter(x.numpy(), y.numpy(), s=1, alpha=0.3)
        ax.set_title(name, fontsize=7)
        ax.set_xlabel("input", fontsize=7)
        ax.set_ylabel("output", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    return _save(fig, path, title)


def dyt_layers(model: nn.Module) -> Iterator[tuple[str, DyT]]:
    for path, module in model.named_modules():
        if isinstance(module, DyT):
            yield path, module


@dataclass
class AlphaTracker:
    """Records, at each :meth:`record`, every DyT's alpha and the 1/std of its latest input.

    Hooks stay on the model until :meth:`close`; the input statistic costs one reduction per DyT
    per forward.
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._inv_std: dict[str, float] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(path)) for path, module in dyt_layers(self.model)
        ]

    def _hook(self, path: str):
        def measure(module, inputs):
            with torch.no_grad():
                std = inputs[0].detach().float().std().item()
            self._inv_std[path] = 1.0 / std if std > 0 else float("inf")

        return measure

    def record(self, step: int) -> dict:
        row = {
            "step": step,
            "alpha": {p: m.alpha.detach().float().item() for p, m in dyt_layers(self.model)},
            "inv_std": dict(self._inv_std),
        }
        self.history.append(row)
        return row

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def save(self, path: str | Path) -> None:
        Path(path).write_text("".join(json.dumps(row) + "\n" for row in self.history))

    def plot(self, path: str | Path, title: str = "DyT alpha vs 1/std of its input") -> Path:
        """Left: alpha per layer over steps. Right: alpha against 1/std, every layer and step."""
        plt = pyplot()
        if not self.history:
            raise ValueError("nothing recorded yet")
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        steps = [row["step"] for row in self.history]
        for name in self.history[-1]["alpha"]:
            left.plot(steps, [row["alpha"].get(name, float("nan")) for row in self.history], label=name)
            pairs = [(row["inv_std"][name], row["alpha"][name]) for row in self.history if name in row["inv_std"]]
            if pairs:
                right.scatter(*zip(*pairs), s=6)
        left.set_xlabel("step")
        left.set_ylabel("alpha")
        right.set_xlabel("1 / std(input)")
        right.set_ylabel("alpha")
        if len(self.history[-1]["alpha"]) <= 12:
            left.legend(fontsize=6)
        return _save(fig, path, title)
