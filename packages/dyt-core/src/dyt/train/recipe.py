"""What a recipe tells the shared comparison (``dyt.train.compare``) and ``scripts/demo.py`` about
itself, in one small frozen dataclass (in the spirit of torchtitan's ``TrainSpec``): the module that
trains it, its config class, the models it compares with their default configs (shipped inside the
package, so an installed console script needs no repository path), the norms compared by default,
its role mapping for ``convert_norms``, the summary of one run and the metrics its sweeps report.

Each recipe package exposes its own as ``<package>.SPEC`` (``dyt_llama.SPEC``, ...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Metric:
    """One number a comparison reports per run (or per downstream seed) and sweeps chart."""

    key: str
    """Where the value is found: a key of the recipe's summary of a run (or of its eval results)."""
    title: str
    """How the report names it, e.g. ``validation loss``."""
    higher_is_better: bool = False
    digits: int = 3
    test: bool = False
    """A test number (downstream test splits): sweeps show it but name no best point on it, and a
    verdict on it picks among several baseline points by a validation metric."""


@dataclass(frozen=True)
class ModelSpec:
    """One model a recipe compares norms on (DNA has two: HyenaDNA and Caduceus)."""

    name: str
    """Short name for folders and keys (``llama``; for DNA the config's ``model.arch``)."""
    title: str
    """Name in reports: ``LLaMA``, ``HyenaDNA``."""
    config: str
    """Its default config, a file inside the recipe package (``configs/tiny.yaml``)."""
    norms: tuple[str, ...]
    """Norms compared by default: the baseline first (what verdicts compare with), then ``dyt``."""

    @property
    def baseline(self) -> str:
        return self.norms[0]


@dataclass(frozen=True)
class RecipeSpec:
    """Everything the shared comparison needs to know about one recipe."""

    name: str
    """Short name (``llama``, ``wav2vec2``, ``dna``): the demo's folder for this recipe."""
    title: str
    package: str
    """The import package holding the default configs (``dyt_llama``)."""
    train_module: str
    """Run as ``python -m`` (or ``deepspeed --module``) for one training run: ``dyt_llama.train``."""
    compare_module: str
    """Whose ``main(argv)`` runs the comparison and returns the report path: ``dyt_llama.compare``."""
    config_class: type
    models: tuple[ModelSpec, ...]
    summarize: Callable[[Any], dict[str, Any]]
    """One finished pretraining run (a ``dyt.train.compare.Run``) -> the numbers of its report row."""
    metrics: tuple[Metric, ...]
    """The pretraining metrics of ``summarize`` that sweeps tabulate and verdicts judge; the first is the
    recipe's main validation metric."""
    role_of: Callable[[str], str] | None = None
    """Module path -> DyT role (attention / ffn / final / input / default) for ``convert_norms`` on this
    recipe's architecture, also as other libraries build it (the demo converts fairseq2's LLaMA)."""
    throughput_unit: str = "units/s"

    def config_path(self, model: ModelSpec | None = None) -> Path:
        """The packaged default config of ``model`` (the first model by default) as a file path."""
        resource = files(self.package).joinpath((model or self.models[0]).config)
        return Path(str(resource))

    def model(self, name: str) -> ModelSpec:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"{self.title} has no model {name!r}; models: {', '.join(m.name for m in self.models)}")

    def default_norm(self):
        """The recipe's own ``model.norm`` defaults (the config class's), with kind ``dyt``: what the
        demo converts other libraries' models to."""
        import dataclasses

        return dataclasses.replace(self.config_class().model.norm, kind="dyt")

    def compare_main(self) -> Callable[[list[str] | None], Path]:
        return importlib.import_module(self.compare_module).main
