"""The one comparison flow every ``dyt-*-compare`` and ``scripts/demo.py`` share: a recipe's
:class:`~dyt.train.recipe.RecipeSpec` names what to train; this module plans one training run per
model x norm x sweep point x seed, launches each under a launcher (resumed if its folder holds a
checkpoint, not launched at all once finished), and holds the report pieces every recipe uses: mean ±
std cells, verdicts against the baseline's seed spread, loss-curve and alpha plots, and the sweep
tables and heatmaps.

A run's facts (model, norm, seed, sweep point) are fields of its :class:`Point`, saved as
``point.json`` in its folder; nothing is read back from folder names or labels."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..analysis import alpha_scale_history, plot_alpha_vs_scale, pyplot
from ..errors import DistinctValues, UserInputError, output_folder
from ..norms import DYT_QUALIFIERS, VARIANTS, NormConfig, norm_variant_overrides
from . import runlock
from .checkpoint import (
    DIVERGED,
    complete_checkpoints,
    divergence_of,
    launches_differing,
    read_divergence,
    saved_world_size,
    settings_changes,
    step_of,
)
from .cli import check_machine
from .config import AT_LEAST_ONE, SEED, load_config, override_keys, section_training_reads_none, setting_value
from .data_files import check_data_unchanged, data_files_of
from .distributed import free_port
from .jsonio import read_json, write_json
from .metrics import read_metrics
from .recipe import Metric, ModelSpec, RecipeSpec

LAUNCHERS = ("deepspeed", "torchrun", "python")
WALL_FILE = "wall_seconds.json"
"""A run's training wall time (seconds), summed over its launches: see run_training."""
POINT_FILE = "point.json"
"""A run's facts (:class:`Point`), written by the comparison before its first launch."""
MIN_VERDICT_SEEDS = 3
NO_VERDICT = f"fewer than {MIN_VERDICT_SEEDS} seeds: no verdict"
ONE_PRETRAINING = "one pretraining run per norm: no verdict"
"""A pretrained downstream row's verdict cell; why, and what to give instead, is said once above the
table (:func:`pretrainings_note`), not in every cell."""


class CompareError(UserInputError):
    kind = "compare error"


# ---------------------------------------------------------------- runs and their facts


@dataclass(frozen=True)
class Point:
    """The facts of one training run of a comparison."""

    norm: str
    seed: int
    model: str = ""
    """The recipe's ``ModelSpec.name`` ("" for a run made outside a recipe comparison)."""
    sweep: tuple[tuple[str, str], ...] = ()
    """(dotted config key, value as given to ``--sweep``) of every sweep that applies to this run."""

    @property
    def cell(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        """What the seeds of one report cell share: (model, norm, sweep)."""
        return self.model, self.norm, self.sweep

    @property
    def label(self) -> str:
        """For printing and chart legends only."""
        return cell_label(self.cell)

    def same_run(self, other: Point) -> bool:
        """Whether ``other`` names this run: the sweep's keys in any order (``--sweep`` options
        given in another order train the same runs)."""
        return (self.model, self.norm, self.seed, sorted(self.sweep)) == (
            other.model, other.norm, other.seed, sorted(other.sweep))

    def dir_name(self) -> str:
        """A folder name made from the facts (never parsed back): values kept readable where they are
        plain, and a hash of the exact sweep whenever there is one, so distinct points never share a
        folder; the sweep's keys sorted, so that one run has one folder whatever the order of the
        ``--sweep`` options."""
        return self._folder_name(sorted(self.sweep))

    def legacy_dir_name(self) -> str:
        """The folder name before 2026-12-05: the sweep's values as given, its keys in the order given."""
        return self._folder_name(list(self.sweep))

    def _folder_name(self, sweep: list[tuple[str, str]]) -> str:
        parts = [self.model, self.norm] if self.model else [self.norm]
        if sweep:
            digest = hashlib.sha1(json.dumps(sweep).encode()).hexdigest()[:6]
            parts.append(",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in sweep) + "-" + digest)
        parts.append(f"seed{self.seed}")
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", "-".join(parts))

    def to_json(self) -> dict:
        return {"model": self.model, "norm": self.norm, "seed": self.seed, "sweep": [list(p) for p in self.sweep]}

    @classmethod
    def from_json(cls, data: dict) -> Point:
        return cls(norm=data["norm"], seed=data["seed"], model=data["model"],
                   sweep=tuple((key, value) for key, value in data["sweep"]))


def describe_sweep(sweep: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sweep) or "-"


@dataclass
class Run:
    """One finished training run of a comparison."""

    point: Point
    dir: Path
    wall_s: float
    diverged: dict | None = None
    """The run's divergence record (``dyt.train.checkpoint.DIVERGED``: the step its training loss went
    NaN or infinite, that loss, the last complete checkpoint) when training stopped there; None for
    a run that trained to its end."""

    @property
    def norm(self) -> str:
        return self.point.norm

    @property
    def seed(self) -> int:
        return self.point.seed

    @property
    def label(self) -> str:
        return self.point.label

    @property
    def metrics(self) -> list[dict]:
        """The run's logged rows (none for a run that diverged before its first logged step)."""
        path = self.dir / "metrics.jsonl"
        return [] if self.diverged is not None and not path.is_file() else read_metrics(path)


def read_point(run_dir: Path) -> Point | None:
    path = Path(run_dir) / POINT_FILE
    if not path.is_file():
        return None
    try:
        return Point.from_json(read_json(path))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CompareError(f"{path} is not the JSON of a run's point; delete that run folder, or use --fresh or "
                           "another --out") from None


# ---------------------------------------------------------------- command line


@dataclass(frozen=True)
class Sweep:
    """One ``--sweep [NORM:]KEY=V1,V2,...``: a config key and its values, for every norm or one."""

    key: str
    values: tuple[str, ...]
    norm: str | None = None

    def applies_to(self, norm: str) -> bool:
        return self.norm is None or self.norm == norm


def parse_sweep(text: str) -> Sweep:
    """``KEY=V1,V2`` or ``NORM:KEY=V1,V2`` (the norm may hold colons itself: ``dyt:x:train.lr=...``;
    a dotted config key never does). Values are applied like ``--set``."""
    target, sep, values = text.partition("=")
    norm, _, key = target.rpartition(":")
    items = tuple(v.strip() for v in values.split(","))
    if not sep or not key.strip() or not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} is not [NORM:]KEY=V1,V2,... (e.g. model.norm.alpha_init.ffn=0.2,0.5)")
    if any(bracket in values for bracket in "[]{}"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the values are split at every comma, so a list or mapping cannot be one of them: sweep a "
            "mapping's keys one by one (model.norm.alpha_init.ffn=0.2,0.5), or run one comparison per list")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"{text!r} lists a value twice")
    return Sweep(key.strip(), items, norm.strip() or None)


NORM_KEYS = frozenset({"model.norm"} | {
    item.partition("=")[0] for name in (*VARIANTS, *(f"dyt:{q}" for q in DYT_QUALIFIERS))
    for item in norm_variant_overrides(name)})
"""The keys a ``--norms`` entry sets (``model.norm.kind``, ``.squash``, ...): a ``--set`` or
``--sweep`` of one would override the norm a run is named and reported by."""

RUN_KEYS = {"train.seed": "from its seed option", "train.out_dir": "a folder of its own under --out"}
"""The keys :func:`run_items` sets: what --set / --sweep may not."""


def add_run_arguments(parser: argparse.ArgumentParser, spec: RecipeSpec) -> None:
    """The options every ``dyt-*-compare`` shares: where runs go, how they are launched, which norms
    and which sweep grid."""
    default_norms = " / ".join(" ".join(m.norms) for m in spec.models)
    parser.add_argument("--norms", nargs="+", metavar="NORM", action=DistinctValues,
                        help=f"norms to train, the baseline first (verdicts compare with it); default {default_norms}")
    parser.add_argument("--sweep", dest="sweeps", action="append", type=parse_sweep, default=[],
                        metavar="[NORM:]KEY=V1,V2,...",
                        help="train every value of a config key (repeatable: the grid of all --sweep options, "
                             "each point with every norm and seed, one resumable run each); NORM: restricts it "
                             "to that norm's runs, e.g. dyt:train.lr=1e-3,2e-3")
    parser.add_argument("--out", type=output_folder, default=Path(f"runs/{spec.name}-compare"),
                        help=f"the runs' folders and report.md (default runs/{spec.name}-compare)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed", help="default deepspeed")
    parser.add_argument("--nproc", type=AT_LEAST_ONE.arg(int), default=2,
                        help="local ranks per training run (default 2; on CUDA at most the GPU count)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the --out folder and everything in it first (refused where --out holds the "
                             "current directory, or holds files no comparison wrote)")


def too_many_ranks(nproc: int, train: Any) -> str | None:
    """Why ``nproc`` local ranks cannot train ``train`` (a run's TrainConfig) here, or None: on CUDA
    each rank takes a device of its own (the launchers hand rank r device r, and rank 1 of 2 on a
    one-GPU machine would fail on a device that is not there, after the data is built)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available():
        return None  # CPU ranks share the cores
    if nproc <= (gpus := torch.cuda.device_count()):
        return None
    if train.global_batch_size is not None:
        keeps = "train.global_batch_size keeps the batch on any rank count that divides it"
    elif nproc % gpus == 0:
        keeps = (f"--set train.grad_accum={train.grad_accum * nproc // gpus} keeps the {nproc}-rank global batch "
                 f"(micro_batch_size x ranks x grad_accum)")
    else:
        keeps = "the global batch is micro_batch_size x ranks x grad_accum"
    return f"--nproc {nproc}: this machine has {gpus} CUDA device(s) and each rank takes one: give --nproc {gpus} or fewer ({keeps})"


def parse_run_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.launcher == "python" and args.nproc != 1:
        parser.error("--launcher python runs one process: use --nproc 1")
    for first, second in itertools.combinations(args.sweeps, 2):
        if first.key == second.key and None in (first.norm, second.norm) or (first.key, first.norm) == (
                second.key, second.norm):
            parser.error(f"argument --sweep: {second.key} is swept twice for the same runs")
    set_keys = override_keys(args.overrides)
    for option, keys in (("--sweep", [sweep.key for sweep in args.sweeps]), ("--set", set_keys)):
        for key in keys:
            for reserved in (k for k in (*sorted(NORM_KEYS), *RUN_KEYS) if k == key or k.startswith(key + ".")):
                what = key if reserved == key else f"{key} (it holds {reserved})"
                if reserved in NORM_KEYS:
                    parser.error(f"argument {option}: {what} is what each --norms entry sets (every run would train "
                                 "the same norm under another name): compare norms and DyT variants with --norms, "
                                 "e.g. --norms rmsnorm dyt dyt:hardtanh")
                # run_items comes last and wins: every point would train the same seed
                parser.error(f"argument {option}: {what} is set for each run by the comparison itself "
                             f"({RUN_KEYS[reserved]}), after --set and --sweep, so it would be ignored")
    if twice := next((k for k in set_keys if set_keys.count(k) > 1), None):
        parser.error(f"argument --set: {twice} is set twice (the last would win without a word): give it once")
    for sweep in args.sweeps:  # a sweep for some norms leaves the --set value to the other norms' runs
        swept_for = {s.norm for s in args.sweeps if s.key == sweep.key}
        if sweep.key in set_keys and (None in swept_for or args.norms is not None and set(args.norms) <= swept_for):
            parser.error(f"argument --set: {sweep.key} is also swept for every run (--sweep {sweep.key}=...), and each "
                         "point's value would replace it: drop the --set, or add its value to the sweep")
    if args.fresh and (problem := fresh_problem(args.out)):
        parser.error(f"argument --fresh: {problem}")
    if args.norms is not None:
        named: dict[tuple[str, ...], str] = {}
        for norm in args.norms:
            try:
                settings = tuple(norm_variant_overrides(norm))
            except UserInputError:
                continue  # an unknown name: the plan names it
            if settings in named:
                parser.error(f"argument --norms: {named[settings]} and {norm} are the same norm "
                             f"({' '.join(settings)}): list it once")
            named[settings] = norm
        for sweep in args.sweeps:
            if sweep.norm is not None and sweep.norm not in args.norms:
                parser.error(f"argument --sweep: {sweep.norm}:{sweep.key} names a norm that is not trained "
                             f"(--norms {' '.join(args.norms)})")
    return args


COMPARISON_MARKS = ((runlock.LOCK_FILE,), ("*/point.json",), ("report.md", "summary.json"))
"""What a comparison leaves in its ``--out``, any one group whole: its lock's file (since
2026-12-06), a run's point, or its report and summary together (a ``report.md`` alone is a common
name). A folder holding files but none of these is not a comparison's."""


def fresh_problem(out: Path) -> str | None:
    """Why ``--fresh`` must not empty ``out``, or None: it holds the current directory, or it holds
    files but nothing a comparison writes (a mistyped ``--out ~`` or ``--out runs`` would otherwise
    lose everything in it)."""
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        return f"it would delete {out}, which holds the current directory; give --out a folder of its own"
    if out.is_dir() and any(out.iterdir()) and not any(
            all(next(out.glob(mark), None) for mark in group) for group in COMPARISON_MARKS):
        return (f"{out} holds files that no comparison wrote (no {runlock.LOCK_FILE}, report, summary or run "
                "folder), and --fresh would delete them all; give --out a folder of its own, or delete what you "
                "mean to yourself")
    return None


def prepare_out(args: argparse.Namespace) -> None:
    """Create ``--out``; with ``--fresh`` empty it of what earlier runs left there first (never a
    folder holding the working directory, nor one no comparison wrote: :func:`fresh_problem`; the
    commands refuse those as they parse their options, and this refuses them again for callers that
    build their arguments themselves). The comparison holds
    ``--out``'s lock from here until it exits: a second comparison there (or a ``--fresh`` one, which
    would delete the first one's runs under it) stops with one line (:mod:`dyt.train.runlock`)."""
    if args.fresh and args.out.exists() and (problem := fresh_problem(args.out)):
        raise CompareError(f"--fresh: {problem}")
    runlock.hold_for_process(args.out, "comparison")
    if args.fresh:
        for entry in args.out.iterdir():
            if entry.name == runlock.LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                with runlock.holding(entry, "launch"):  # a run still training there (a killed comparison's child)
                    pass
                shutil.rmtree(entry)
            else:
                entry.unlink()


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (a packaged config of an
    editable install reads ``packages/dyt-llama/src/dyt_llama/configs/tiny.yaml``), else as is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- planning and launching


def setting_text(value: Any, given: str) -> str:
    """A swept value as the setting it makes (a number, a boolean or null as its value reads), so
    that spellings of one setting (``1e-3`` and ``0.001``, ``yes`` and ``true``) are one sweep point,
    one label and one run folder; a string or mapping setting keeps the text as given."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    return given


def canonical_sweeps(spec: RecipeSpec, args: argparse.Namespace,
                     models: Sequence[tuple[ModelSpec, Path]]) -> tuple[list[Sweep], dict[tuple[str, str], str]]:
    """``args.sweeps`` with every value as :func:`setting_text` writes it, read from the configs of
    the grid's points (each over ``--set``, its norm and the point's other values: settings checked
    against each other, e.g. ``train.min_lr`` against a swept ``train.lr``, see the point's own);
    two values that make one setting are an error, as a value given twice is. Also returns each
    (key, written value)'s spelling as given, which named run folders before 2026-12-05."""
    texts: dict[tuple[str, str], str] = {}
    for model, config_path in models:
        for norm in args.norms or model.norms:
            for point in grid(args.sweeps, norm):
                items = [*args.overrides, *norm_variant_overrides(norm), *(f"{k}={v}" for k, v in point)]
                config = load_config(spec.config_class, config_path, items, check_files=False)
                for key, given in point:
                    texts.setdefault((key, given), setting_text(setting_value(config, key), given))
    sweeps, spelled = [], {}
    for sweep in args.sweeps:
        written: dict[str, str] = {}
        for given in sweep.values:
            text = texts.get((sweep.key, given), given)  # a norm no run trains: plan_runs says so
            if text in written:
                raise CompareError(f"--sweep {sweep.key}: {written[text]} and {given} are the same setting ({text}); "
                                   "give it once")
            written[text] = given
            spelled[(sweep.key, text)] = given
        sweeps.append(replace(sweep, values=tuple(written)))
    return sweeps, spelled


def grid(sweeps: Sequence[Sweep], norm: str) -> list[tuple[tuple[str, str], ...]]:
    """Every sweep point of ``norm``'s runs: the product of the sweeps that apply to it, in the
    order given (one empty point without sweeps)."""
    mine = [s for s in sweeps if s.applies_to(norm)]
    return [tuple(zip((s.key for s in mine), values)) for values in itertools.product(*(s.values for s in mine))]


@dataclass(frozen=True)
class PlannedRun:
    """One training run to make: its facts, where it goes, and the config it will train with."""

    point: Point
    config_path: Path
    overrides: tuple[str, ...]
    """``--set`` items after the config file (``run_training`` adds train.seed and train.out_dir)."""
    dir: Path
    config: Any = field(compare=False)
    as_given: Point | None = None
    """The point with its values spelled as given and its keys in the order given, where that named
    another folder before 2026-12-05 (``Point.legacy_dir_name``): ``train_runs`` moves such a folder."""


def plan_runs(spec: RecipeSpec, args: argparse.Namespace, models: Sequence[tuple[ModelSpec, Path]],
              seeds: Sequence[int]) -> list[PlannedRun]:
    """Every run of a comparison: per model, seeds outermost (the whole comparison at the first seed
    comes first), then norms, then sweep points. Each config is resolved now, so that a bad key or
    value in ``--set``, ``--norms`` or ``--sweep``, what a run still to train asks of this machine
    (:func:`~dyt.train.cli.check_machine`: a DyT backend this device cannot run, fp16 on a CPU), or
    validation turned off (a report compares validation) stops the command before anything is
    launched, not after the runs before it have trained. ``args.sweeps`` is replaced by
    :func:`canonical_sweeps` first: the points, labels and report tables use the values so written."""
    if args.sweeps:  # whatever its values: no point of such a sweep would train another model
        given = load_config(spec.config_class, models[0][1], args.overrides, check_files=False)
        for sweep in args.sweeps:
            if (section := section_training_reads_none(given, sweep.key)) is not None:
                raise CompareError(
                    f"--sweep {sweep.norm + ':' if sweep.norm else ''}{sweep.key}: {section} holds the settings of what "
                    "runs after training (no training reads them, and every run of a comparison is evaluated alike), "
                    f"so every point would train the same model: give it with --set {sweep.key}=VALUE")
    args.sweeps, spelled = canonical_sweeps(spec, args, models)
    plan = []
    for model, config_path in models:
        norms = args.norms or list(model.norms)
        for seed in seeds:
            for norm in norms:
                for sweep in grid(args.sweeps, norm):
                    point = Point(norm=norm, seed=seed, model=model.name, sweep=sweep)
                    out = args.out / point.dir_name()
                    overrides = (*args.overrides, *norm_variant_overrides(norm), *(f"{k}={v}" for k, v in sweep))
                    config = load_config(spec.config_class, config_path, [*overrides, *run_items(seed, out)])
                    if getattr(args, "fresh", False) or finished_step(out) < config.train.steps:
                        check_machine(config, args.nproc)  # a finished run is not launched: its report needs no training here
                        if (problem := too_many_ranks(args.nproc, config.train)) is not None:
                            raise CompareError(problem)
                    if config.train.eval_every == 0:
                        raise CompareError(f"{point.label}: train.eval_every=0 turns validation off, and the report "
                                           "compares each run's validation: give a positive train.eval_every "
                                           "(how often it validates changes no trained weight)")
                    as_given = replace(point, sweep=tuple((k, spelled[(k, v)]) for k, v in sweep))
                    moved = args.out / as_given.legacy_dir_name() != out
                    plan.append(PlannedRun(point, Path(config_path), overrides, out, config, as_given if moved else None))
    trained = {p.point.norm for p in plan}
    for sweep in (s for s in args.sweeps if len(s.values) > 1):
        for planned in (p for p in plan if sweep.norm in (None, p.point.norm)):
            norm_config, name = _norm_field(planned.config, sweep.key)
            if norm_config is not None and not norm_config.reads(name):
                readers = sorted(kind for kind, names in NormConfig.READ_BY_KIND.items() if name in names)
                ours = [p.point.norm for p in plan if (n := _norm_field(p.config, sweep.key)[0]) and n.reads(name)]
                raise CompareError(
                    f"--sweep {sweep.norm + ':' if sweep.norm else ''}{sweep.key}: the {planned.point.norm} runs build "
                    f"no layer that reads model.norm.{name} "
                    f"(a {' or '.join(readers) or 'no'} setting), so its {len(sweep.values)} points would train one "
                    f"model {len(sweep.values)} times: "
                    + (f"sweep it for the norms that read it, e.g. --sweep {ours[0]}:{sweep.key}={','.join(sweep.values)}"
                       if ours else "no norm of this comparison reads it: drop the sweep"))
    for sweep in args.sweeps:
        if sweep.norm is not None and sweep.norm not in trained:
            raise CompareError(f"--sweep {sweep.norm}:{sweep.key} names a norm no run trains "
                               f"(norms: {', '.join(sorted(trained))})")
    return plan


def _norm_field(config: Any, key: str) -> tuple[NormConfig | None, str]:
    """The norm config a dotted ``key`` lies in and the field of it the key sets (``model.norm.alpha_init.ffn``:
    the model's NormConfig and ``alpha_init``); (None, "") where the key is no norm setting."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, NormConfig):
            return node, part
        if not hasattr(node, part) or i == len(parts) - 1:
            return None, ""
        node = getattr(node, part)
    return None, ""


def train_runs(spec: RecipeSpec, args: argparse.Namespace, plan: Sequence[PlannedRun]) -> list[Run]:
    """Train every planned run (finished ones are not launched again) and return them in plan order.
    First, before any launch: a run already in ``--out`` with a complete checkpoint that was trained
    with other settings that make its numbers (model, optimizer, schedule, batches, validation
    examples: :func:`settings_changes`), on another number of ranks, or whose data files changed since
    (:func:`~dyt.train.data_files.check_data_unchanged`) is an error, not a result to report beside
    runs trained as planned; one without a checkpoint starts afresh anyway."""
    signatures: dict[str, dict | None] = {}  # per data section: runs of one comparison share their files
    allowed: dict[Path, list[str]] = {}  # changes a run may take, said of a finished run that is not relaunched
    for planned in plan:  # a run trained before run folders were named by the settings: moved, not trained again
        legacy = args.out / planned.as_given.legacy_dir_name() if planned.as_given is not None else None
        if legacy is not None and legacy.is_dir() and not planned.dir.exists():
            saved = read_point(legacy)
            if saved is not None and saved.same_run(planned.as_given):
                legacy.rename(planned.dir)
                write_json(planned.dir / POINT_FILE, planned.point.to_json())
                print(f"moved {shown_path(legacy)} to {shown_path(planned.dir)} (run folders are named by the "
                      "settings a sweep makes since 2026-12-05)", flush=True)
    for planned in plan:
        saved = read_point(planned.dir)
        if saved is not None and not saved.same_run(planned.point):
            raise CompareError(f"{planned.dir} holds the run {saved}, not {planned.point}; use another --out or --fresh")
    for planned in (p for p in plan if finished_step(p.dir) > 0):
        try:
            changes = settings_changes(planned.config)
            # every launch of the run, not only the latest whose settings config.yaml holds
            history = launches_differing(planned.config, args.nproc)
        except UserInputError as error:
            raise CompareError(f"{error}; use --fresh or another --out to train it anew") from None
        if history is None:  # a run from before launches were recorded: its latest settings and ranks
            different = (changes.fixed + changes.results) if changes else []
            world = saved_world_size(complete_checkpoints(planned.dir / "checkpoints")[-1])
            if world != args.nproc:  # another global batch (and, before 2026-12-06, other validation examples)
                different.append(f"ranks {world} -> {args.nproc}")
        else:
            different = history
        if different:
            raise CompareError(f"{planned.dir} was trained with other settings than this comparison's: {'; '.join(different)}; "
                               "put them back, or use --fresh or another --out to train it anew")
        allowed[planned.dir] = changes.allowed if changes else []
        data = repr(getattr(planned.config, "data", None))
        if data not in signatures:
            signatures[data] = data_files_of(planned.config)
        check_data_unchanged(planned.dir, signatures[data])
    runs = []
    for planned in plan:
        planned.dir.mkdir(parents=True, exist_ok=True)
        if read_point(planned.dir) is None:  # its point checked above, before any launch
            write_json(planned.dir / POINT_FILE, planned.point.to_json())
        diverged = None  # a divergence with this run's settings and data: not launched again
        if read_divergence(planned.dir) is not None:
            data = repr(getattr(planned.config, "data", None))
            if data not in signatures:
                signatures[data] = data_files_of(planned.config)
            diverged = divergence_of(planned.config, args.nproc, signatures[data])
        wall = run_training(spec.train_module, planned.config_path, planned.dir, planned.overrides,
                            seed=planned.point.seed, label=planned.point.label, launcher=args.launcher, nproc=args.nproc,
                            steps=planned.config.train.steps, changes=allowed.get(planned.dir, []), diverged=diverged)
        if diverged is None and finished_step(planned.dir) < planned.config.train.steps:
            diverged = read_divergence(planned.dir)  # this launch's (run_training raised on any other failure)
        runs.append(Run(planned.point, planned.dir, wall, diverged))
    return runs


def launch_command(module: str, launcher: str, nproc: int) -> list[str]:
    """The command that starts ``python -m module`` on ``nproc`` local ranks."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if launcher == "python" and nproc != 1:
        raise ValueError("the python launcher runs one process: use nproc 1")
    # The launchers' modules under this interpreter, not their console scripts: those are not beside
    # sys.executable in a --user or system install.
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port()), "--module", module]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", module]
    return [sys.executable, "-m", module]


def launch_env(nproc: int) -> dict[str, str]:
    """This process's environment for a fresh world of ``nproc`` local ranks."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # Ranks sharing a few cores: spinning OpenMP workers of one rank starve the other (measured
        # on 2 cores, 2 ranks: DyT compiled 5349 tokens/s spinning, 7340 passive).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def finished_step(out: Path) -> int:
    """The step of the newest complete checkpoint in ``out`` (0 for none): the step a ``--resume``
    launch would start from, and train nothing when that is at ``train.steps`` already."""
    done = complete_checkpoints(Path(out) / "checkpoints")
    return step_of(done[-1]) if done else 0


def run_items(seed: int, out: Path) -> list[str]:
    """The ``--set`` items a comparison gives every run after its own: its seed and its folder."""
    return [f"train.seed={seed}", f"train.out_dir={out}"]


def run_training(
    module: str, config: Path, out: Path, overrides: Sequence[str], *, seed: int, label: str,
    launcher: str = "deepspeed", nproc: int = 2, steps: int | None = None, changes: Sequence[str] = (),
    diverged: dict | None = None,
) -> float:
    """Train ``module`` with ``config`` + ``overrides`` + ``seed`` into ``out`` (``--resume``: what is there
    continues); returns the run's training wall time in seconds.

    With ``steps`` (the run's ``train.steps``), a run whose newest complete checkpoint is at that step
    already is not launched at all: the trainer would resume there and train nothing. ``changes`` (the
    settings a run may change that differ from its saved ``config.yaml``, e.g. cadences: :func:`train_runs`
    refuses the others before any launch) are then printed: the finished run's results were made with
    the saved ones.

    A run whose training loss went NaN or infinite (its launch wrote ``DIVERGED``) does not stop the
    comparison: it is reported as diverged. ``diverged``: that record, when it was made with this
    run's settings (``dyt.train.checkpoint.divergence_of``): the run is not launched again, as an exact
    resume would replay the same steps.

    The wall time is the sum over the launches that trained steps, kept in ``out``, so a run that was
    already finished reports the time it took then, not that of the check."""
    wall_file = out / WALL_FILE
    done = finished_step(out)
    if diverged is not None:
        print(f"\n== {label}, seed {seed}: diverged at step {diverged['step']} (training loss {diverged['loss']}) in "
              f"{out}; not launched again, as the same settings and data would replay the same steps (delete its "
              f"{DIVERGED} to launch it anyway)", flush=True)
        return _recorded_wall(wall_file)
    if steps is not None and done >= steps:
        print(f"\n== {label}, seed {seed}: finished (step {done} of {steps}) in {out}; not launched again", flush=True)
        if changes:
            print(f"   note: trained with {'; '.join(changes)} (old -> this comparison's); its results are reported "
                  "as trained (--fresh or another --out trains it anew)", flush=True)
        return _recorded_wall(wall_file)
    cmd = launch_command(module, launcher, nproc) + ["--config", str(config), "--resume"]
    for item in [*overrides, *run_items(seed, out)]:
        cmd += ["--set", item]
    print(f"\n== {label}, seed {seed}: {' '.join(cmd)}", flush=True)
    (out / DIVERGED).unlink(missing_ok=True)  # another launch's, with other settings: a record after this one is its own
    if done == 0:  # the run starts from step 0: the seconds of launches before its first checkpoint made nothing kept
        wall_file.unlink(missing_ok=True)
    steps_before = _last_step(out) if done else 0
    started = time.perf_counter()
    try:
        subprocess.run(cmd, env=launch_env(nproc), check=True)
    except subprocess.CalledProcessError:
        if not (out / DIVERGED).is_file():  # every launch removes an older record first
            raise
        record = json.loads((out / DIVERGED).read_text())
        print(f"\n== {label}, seed {seed}: diverged at step {record['step']} (training loss {record['loss']}); "
              "reported as diverged, the comparison goes on", flush=True)
    finally:
        wall = _recorded_wall(wall_file)
        if _last_step(out) > steps_before or (out / DIVERGED).is_file():  # it trained steps
            wall += time.perf_counter() - started
            write_json(wall_file, {"seconds": wall})
    return wall


def _recorded_wall(wall_file: Path) -> float:
    """The training seconds kept in a run's ``WALL_FILE`` (0 for none yet)."""
    saved = read_json(wall_file)
    return float(saved["seconds"]) if isinstance(saved, dict) and "seconds" in saved else 0.0


def _last_step(out: Path) -> int:
    """The last step a run in ``out`` logged (0 for none)."""
    path = out / "metrics.jsonl"
    return max((row["step"] for row in read_metrics(path, partial_last=True)), default=0) if path.is_file() else 0


EVALS_VERSION = 8
"""Bumped whenever a change to the downstream evals changes their results (2: the head's
standardising floor, 2026-12-02; 3: macro F1 over classes true or predicted, wav2vec 2.0 Base's
GroupNorm and Caduceus' flips over real frames / bases only, 2026-12-05; 4: the wav2vec 2.0
random-init probe draws its backbone per seed, the contrastive eval counts each recording once and
weighs batches by their utterances; 5: the wav2vec 2.0 random-init CTC draws its feature extractor
per seed, 2026-12-05; 6: fine-tuning decays matrices only, and the DNA classifier computes each
sigma-reparam weight once per forward, 2026-12-05; 7: the wav2vec 2.0 CTC eval reads normalised
waveforms, as pretraining and the other evals do, 2026-12-05; 8: the wav2vec 2.0 contrastive eval
batches recordings of like length and crops each batch to its shortest, as pretraining now does,
2026-12-06), so that a relaunch recomputes what older code stored instead of
reporting it beside new results."""


def reuse_or_compute(path: Path, settings: dict, seeds: Sequence[int],
                     compute: Callable[[list[int]], Iterable[Any]]) -> list:
    """One JSON result per seed of ``seeds``, in their order: the seeds stored at ``path`` with the same
    ``settings`` by evals of this ``EVALS_VERSION``; for the others, what ``compute(missing)`` yields, one
    result per missing seed in their order, each stored as it comes. A killed comparison loses at most
    the seed it was on, and a later one with more seeds computes only those (``settings`` hold no seeds).
    What is read back, and stored seeds of other settings that are replaced, are said in one line."""
    saved = read_json(path)  # none, or cut short by a kill before writes were atomic: computed again
    done: dict[str, Any] = {}
    if (isinstance(saved, dict) and saved.get("evals_version") == EVALS_VERSION
            and isinstance(saved.get("seeds"), dict) and saved["seeds"]):
        if saved.get("settings") == settings:
            done = saved["seeds"]
        else:
            changed = "; ".join(setting_differences(saved.get("settings"), settings))
            print(f"{shown_path(path)}: its seeds were evaluated with other settings ({changed}); evaluated again, "
                  "replacing them", flush=True)
    missing = [seed for seed in seeds if str(seed) not in done]
    if reused := [seed for seed in seeds if str(seed) in done]:
        print(f"{shown_path(path)}: seeds {reused} read back" + (f", computing {missing}" if missing else ""), flush=True)
    if missing:
        for seed, result in zip(missing, compute(missing), strict=True):
            done[str(seed)] = result
            write_json(path, {"settings": settings, "evals_version": EVALS_VERSION, "seeds": done})
    return [done[str(seed)] for seed in seeds]


def setting_differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``key old -> new`` for each entry where two (nested) settings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for name in sorted(old.keys() | new.keys(), key=str)
                for change in setting_differences(old.get(name, "(none)"), new.get(name, "(none)"),
                                                  f"{key}.{name}" if key else str(name))]
    return [] if old == new else [f"{key or 'settings'} {old!r} -> {new!r}"]


class EvalOutError(UserInputError):
    """A standalone eval's ``--out`` that holds what the eval must not overwrite."""

    kind = "output error"


def read_eval_out(path: Path, expected: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """What a standalone eval's ``--out`` holds: eval name -> ``{"settings", "seeds"}`` ({} where there
    is no file yet, or an empty one). Any other file (a run's config.yaml given by mistake, the list of
    rows evals wrote before 2026-12-07, results of older evals) is refused, not overwritten; so is an
    eval of ``expected`` (name -> settings) held with other settings, before any eval computes."""
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return {}
    saved = read_json(path)
    evals = saved.get("evals") if isinstance(saved, dict) else None
    if not (isinstance(evals, dict) and "evals_version" in saved
            and all(isinstance(e, dict) and "settings" in e and isinstance(e.get("seeds"), dict) for e in evals.values())):
        raise EvalOutError(f"--out {path} exists and is not a results file an eval writes (since 2026-12-07): give "
                           "another --out; nothing was written to it")
    if saved["evals_version"] != EVALS_VERSION:
        raise EvalOutError(f"--out {path} holds results of older evals (version {saved['evals_version']}, now "
                           f"{EVALS_VERSION}) that new ones would not match: give another --out, or delete it")
    for name, settings in (expected or {}).items():
        if name in evals and (changed := setting_differences(evals[name]["settings"], _as_stored(settings))):
            raise EvalOutError(f"--out {path} holds {name} results of other settings ({'; '.join(changed)}): give "
                               "another --out, or delete it to replace them")
    return evals


def _as_stored(settings: dict) -> Any:
    """``settings`` as JSON gives them back (tuples as lists), to compare with stored ones."""
    return json.loads(json.dumps(settings))


def eval_out_seeds(path: Path, name: str, settings: dict, seeds: Sequence[int],
                   compute: Callable[[list[int]], Iterable[dict]], device: torch.device | str) -> list[dict]:
    """A standalone eval's results for ``name``, one per seed of ``seeds``, kept in ``path`` (its
    ``--out``) as each seed finishes, as the compare keeps its own (:func:`reuse_or_compute`): seeds
    the file holds for the same ``settings`` are read back, so a killed eval resumes and one with more
    seeds computes only those; ``name`` held for other settings (another run, checkpoint or budget) is
    refused, naming what differs, not overwritten. Each row computed here names its ``device``. Each
    write takes the file's lock and reads it again, so evals of other names may share the file."""
    from filelock import FileLock

    settings = _as_stored(settings)
    evals = read_eval_out(path, {name: settings})
    done: dict[str, dict] = dict(evals[name]["seeds"]) if name in evals else {}
    missing = [seed for seed in seeds if str(seed) not in done]
    if reused := [seed for seed in seeds if str(seed) in done]:
        print(f"{name}: seeds {reused} read back from {path}" + (f", computing {missing}" if missing else ""),
              flush=True)
    if missing:
        for seed, row in zip(missing, compute(missing), strict=True):
            done[str(seed)] = {**row, "device": str(device)}
            with FileLock(f"{path}.lock"):
                evals = read_eval_out(path, {name: settings})
                evals[name] = {"settings": settings, "seeds": {**evals.get(name, {}).get("seeds", {}), **done}}
                write_json(path, {"evals_version": EVALS_VERSION, "evals": evals})
    return [done[str(seed)] for seed in seeds]


# ---------------------------------------------------------------- numbers and verdicts


def not_finite(values: Sequence[float]) -> int:
    """How many of ``values`` are NaN or infinite (a seed whose validation diverged)."""
    return sum(not math.isfinite(v) for v in values)


def seed_mean(values: Sequence[float]) -> float:
    """The mean over seeds; NaN where a seed's value is not finite (``statistics`` raises there)."""
    return statistics.mean(values) if not not_finite(values) else math.nan


def ranking_mean(values: Sequence[float], higher_is_better: bool) -> float:
    """The mean that ranks a cell among others: one with a seed that is not finite ranks last (a
    NaN would win or lose by its place in the list)."""
    if not_finite(values):
        return -math.inf if higher_is_better else math.inf
    return statistics.mean(values)


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (just the value for one seed); seeds that are not finite are left
    out of it and counted."""
    if bad := not_finite(values):
        finite = [v for v in values if math.isfinite(v)]
        return (f"{mean_std(finite, digits)} " if finite else "") + f"({bad} of {len(values)} seeds not finite)"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def two_sigma(reference: Sequence[float], other: Sequence[float]) -> float:
    """Twice the sample standard deviation of ``reference``; where its seeds all gave the same value
    (a model stuck on one answer: every seed's accuracy exactly chance), twice that of ``other``, so
    that a difference within the other side's own noise is not called better or worse."""
    return 2 * (statistics.stdev(reference) or statistics.stdev(other))


def _not_finite_note(*rows: tuple[Sequence[float], str]) -> str | None:
    """"no verdict" naming the rows with seeds that are not finite; None where every seed is."""
    bad = [f"{not_finite(values)} of {len(values)} seeds of {who}" for values, who in rows if not_finite(values)]
    return f"no verdict: not finite in {' and '.join(bad)}" if bad else None


def verdict(values: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool, digits: int = 3,
            baseline_name: str = "the baseline") -> str:
    """In words: does the mean of ``values`` (DyT's, over seeds) lie within the baseline's mean ± 2σ
    (σ: the baseline's sample standard deviation over its seeds; :func:`two_sigma`)? Both need at
    least 3 seeds."""
    if min(len(values), len(baseline)) < MIN_VERDICT_SEEDS:
        return NO_VERDICT
    if unusable := _not_finite_note((values, "this row"), (baseline, baseline_name)):
        return unusable
    centre, spread = statistics.mean(baseline), two_sigma(baseline, values)
    low, high = centre - spread, centre + spread
    mean = statistics.mean(values)
    band = f"{baseline_name}'s mean ± 2σ [{low:.{digits}f}, {high:.{digits}f}]"
    if statistics.stdev(baseline) == 0:
        band += " (σ of this row's seeds: the baseline's all agree)"
    if low <= mean <= high:
        return f"within {band}"
    better = (mean > high) if higher_is_better else (mean < low)
    return f"{'better' if better else 'worse'} than {band}"


def over_pretrainings(per_run: Sequence[Sequence[float]]) -> list[float]:
    """One cell's downstream values, for its mean ± std and verdicts, from each pretraining run's values
    over the fine-tuning seeds: with several pretraining runs, each run's mean (the spread between
    pretrainings, which fine-tuning seeds of one checkpoint understate; fewer than
    ``MIN_VERDICT_SEEDS`` of them: no verdict); with one, its fine-tuning values (the spread of
    fine-tuning that checkpoint)."""
    if len(per_run) > 1:
        return [seed_mean(values) for values in per_run]
    return [value for values in per_run for value in values]


def fine_tuned_runs(runs: Sequence[Run], pretrained: bool) -> list[Run]:
    """The runs whose downstream evals a comparison makes: from the pretrained checkpoint, every run
    that trained to its end (a diverged one has no trained model: :func:`diverged_values` stands in);
    from random init, the first run of each cell only. No pretraining seed changes an untrained model
    (a random-init fine-tuning draws it from the fine-tuning seed), so fine-tuning it once per pretraining
    run would repeat one result, and averaging the copies would report a spread of 0."""
    if pretrained:
        return [run for run in runs if run.diverged is None]
    first: dict[Cell, Run] = {}
    for run in runs:
        first.setdefault(run.point.cell, run)
    return list(first.values())


def diverged_values(seeds: Sequence[int]) -> list[float]:
    """A diverged pretraining run's downstream values, one per fine-tuning seed: NaN, so that its
    cell names it as not finite and gets no verdict, instead of a mean over the runs that trained."""
    return [math.nan] * len(seeds)


INITS = {True: "pretrained", False: "random init"}
"""A downstream row's init in words, keyed by ``pretrained``, for printing only: every downstream eval
runs on the pretrained model and on the same model untrained, whose gap is what pretraining bought."""


def checkpoint_setting(run: Run, pretrained: bool) -> dict[str, int]:
    """The stored eval settings' entry naming the checkpoint a pretrained model came from, so that a
    run trained further is evaluated again; an untrained model reads no checkpoint."""
    return {"checkpoint_step": finished_step(run.dir)} if pretrained else {}


def stored_eval(run: Run, stem: str, pretrained: bool, settings: dict, seeds: Sequence[int],
                compute: Callable[[list[int]], Iterable[dict]], device: torch.device) -> list[dict]:
    """:func:`reuse_or_compute` in the run's ``<stem>.json``, or ``<stem>-random-init.json`` for the
    untrained model, so that neither overwrites the other; each result computed here names the
    ``device`` it ran on (not a setting: a stored result is reused on any device)."""
    return reuse_or_compute(run.dir / f"{stem}{'' if pretrained else '-random-init'}.json", settings, seeds,
                            lambda missing: ({**row, "device": str(device)} for row in compute(missing)))


def downstream_evals(runs: Sequence[Run], evaluate: Callable[[Run, bool], Any]) -> dict[tuple[Point, bool], Any]:
    """``evaluate(run, pretrained)`` for every run :func:`fine_tuned_runs` names, keyed
    ``(run.point, pretrained)`` in the order of the report's rows (the pretrained models, then random
    init once per cell); a diverged run's pretrained entry is None (no model to evaluate:
    :func:`downstream_values` gives it NaN)."""
    evals = {}
    for pretrained in (True, False):
        evaluated = fine_tuned_runs(runs, pretrained)
        for run in runs if pretrained else evaluated:
            evals[run.point, pretrained] = evaluate(run, pretrained) if run in evaluated else None
    return evals


def downstream_values(evals: Mapping[tuple[Point, bool], Any], pretrained: bool,
                      values: Callable[[Any], Sequence[float]], seeds: Sequence[int]) -> dict[Cell, list[float]]:
    """Each cell's values of one downstream number, as means and verdicts take them
    (:func:`over_pretrainings`), from the results of :func:`downstream_evals` with this ``pretrained``:
    ``values(result)`` per run, NaN for a diverged run's (:func:`diverged_values`)."""
    per_run: dict[Cell, list[Sequence[float]]] = {}
    for (point, made_pretrained), result in evals.items():
        if made_pretrained == pretrained:
            per_run.setdefault(point.cell, []).append(diverged_values(seeds) if result is None else values(result))
    return {cell: over_pretrainings(each) for cell, each in per_run.items()}


def divergence_notes(runs: Sequence[Run]) -> list[str]:
    """A report's lines naming every diverged run (step, loss, last complete checkpoint); none if no
    run diverged."""
    models = len({run.point.model for run in runs}) > 1  # DNA compares two: name the model too
    named = [f"- {f'{run.point.model} ' if models else ''}{run.label}, seed {run.seed}: training loss "
             f"{run.diverged['loss']} at step {run.diverged['step']} "
             f"(last complete checkpoint: {run.diverged['last_good'] or 'none'})" for run in runs if run.diverged]
    if not named:
        return []
    return ["**Diverged** (training stopped there; the run's validation and downstream numbers count as not "
            "finite: named in its cells, no verdict on them, ranked last in sweeps; a relaunch with the same "
            "settings and data skips it: delete the run's `diverged.json` to launch it again, `--fresh` to train "
            "every run anew):", "", *named, ""]


def add_pretrain_seeds_argument(parser: argparse.ArgumentParser) -> None:
    """``--pretrain-seeds`` of the comparisons that fine-tune downstream (``--seeds`` are then the
    fine-tuning seeds); ``--pretrain-seed`` is the same option."""
    parser.add_argument("--pretrain-seeds", "--pretrain-seed", dest="pretrain_seeds", action=DistinctValues,
                        nargs="+", type=SEED.arg(int), default=[0],
                        help=f"pretraining seeds, one run each per norm (default 0; {MIN_VERDICT_SEEDS} or more: "
                             "downstream means, spreads and verdicts over the pretrainings)")


def pretrainings_note(pretrain_seeds: Sequence[int]) -> str:
    """What a downstream cell's mean ± std is over (see :func:`over_pretrainings`), in words."""
    seeds = ", ".join(map(str, pretrain_seeds))
    untrained = ("Random-init rows: the fine-tuning seeds of the one untrained model (no pretraining seed "
                 "changes it).")
    if len(pretrain_seeds) > 1:
        return (f"Pretraining seeds {seeds}: each pretrained row's mean ± std and verdict are over the pretraining "
                f"runs' means (each the mean over the fine-tuning seeds; fewer than {MIN_VERDICT_SEEDS} runs: no "
                f"verdict). {untrained}")
    return (f"Pretraining seed {seeds}: each mean ± std is over the fine-tuning seeds, so it measures fine-tuning "
            "spread only; the pretrained rows get no verdict between norms (one checkpoint each) and random-init rows "
            f"get theirs over the fine-tuning seeds (give {MIN_VERDICT_SEEDS} pretraining seeds for the spread between "
            "pretrainings and verdicts on them).")


def pretraining_gain(pretrained: Sequence[float], untrained: Sequence[float], *, higher_is_better: bool,
                     digits: int = 3) -> str:
    """What pretraining bought on a downstream metric, in words: the pretrained model's mean minus the
    same model's untrained (random init) mean over the same seeds and budget, and whether the
    difference lies beyond the untrained runs' mean ± 2σ (as :func:`verdict` judges: >= 3 seeds each).
    A verdict between norms says nothing of this: two models that learned nothing tie."""
    if min(len(pretrained), len(untrained)) < MIN_VERDICT_SEEDS:
        return NO_VERDICT
    if unusable := _not_finite_note((pretrained, "the pretrained rows"), (untrained, "random init")):
        return unusable
    gain = statistics.mean(pretrained) - statistics.mean(untrained)
    spread = two_sigma(untrained, pretrained)
    if abs(gain) <= spread:
        whose = "random init's" if statistics.stdev(untrained) else "the pretrained runs'"
        return f"{gain:+.{digits}f}, within {whose} ± 2σ ({spread:.{digits}f}): no gain"
    return f"{gain:+.{digits}f}, {'better' if (gain > 0) == higher_is_better else 'worse'} than random init"


Cell = tuple[str, str, tuple[tuple[str, str], ...]]
"""(model, norm, sweep): the runs (or downstream seeds) one report cell averages over."""


def baseline_cell(cell: Cell, cells: Iterable[Cell], baseline: str, score: Callable[[Cell], float] | None = None,
                  higher_is_better: bool = False, tuned: Collection[str] = ()) -> Cell | None:
    """The baseline cell ``cell`` is judged against: the baseline's cell of the same model that has
    the same value of every sweep key both share (a sweep of every norm: each point against the
    baseline's same point), bar the ``tuned`` keys: those swept for one norm alone (``NORM:KEY``,
    e.g. ``rmsnorm:train.lr=...`` beside ``dyt:train.lr=...``), each norm's own tuning, never paired
    by value. Where several cells match, the best by ``score``. None without a baseline cell."""
    model, _, sweep = cell
    mine = dict(sweep)
    matches = [c for c in cells if c[0] == model and c[1] == baseline
               and all(mine.get(key, value) == value for key, value in c[2] if key not in tuned)]
    if not matches:
        return None
    if len(matches) == 1 or score is None:
        return matches[0]
    return (max if higher_is_better else min)(matches, key=score)


def tuned_keys(args: argparse.Namespace) -> frozenset[str]:
    """The keys swept for one norm alone (``--sweep NORM:KEY=...``): tuning, never paired across norms."""
    return frozenset(s.key for s in args.sweeps if s.norm is not None)


def baseline_norm(args: argparse.Namespace, model: ModelSpec) -> str:
    """The norm verdicts on ``model`` compare with: the first of ``--norms``, else of the model's own."""
    return (args.norms or model.norms)[0]


def judge(cell: Cell, numbers: dict[Cell, Sequence[float]], baseline: str, *, higher_is_better: bool,
          digits: int = 3, choose_by: dict[Cell, Sequence[float]] | None = None, choose_higher: bool = False,
          pretrainings: int | None = None, withheld: Callable[[Cell], str | None] | None = None,
          tuned: Collection[str] = ()) -> str:
    """A report's verdict cell for ``cell`` (``numbers``: every cell's values over seeds): ``baseline``
    for the baseline norm's own cells, else :func:`verdict` against the baseline cell it is judged
    against (:func:`baseline_cell`). Where several baseline cells match (the baseline swept keys of
    its own), the best is chosen by ``choose_by`` (a validation metric, ``choose_higher`` if higher
    is better), never by test numbers; without it, by ``numbers`` (themselves validation numbers).
    ``pretrainings``: for a pretrained model's downstream values, how many pretraining runs per cell
    they come from; one gives :data:`ONE_PRETRAINING`, as its values are one checkpoint's fine-tunings.
    ``withheld``: a recipe's reason to give no verdict against a baseline cell (wav2vec 2.0: a
    collapsed pretraining run in it), or None. ``tuned``: :func:`tuned_keys`."""
    if cell[1] == baseline:
        return "baseline"
    if choose_by is None:
        choose_by, choose_higher = numbers, higher_is_better
    reference = baseline_cell(cell, numbers, baseline, lambda c: ranking_mean(choose_by[c], choose_higher), choose_higher,
                              tuned)
    if reference is None:
        return "no baseline run"
    if pretrainings == 1:
        return ONE_PRETRAINING
    if withheld is not None and (reason := withheld(reference)):
        return reason
    return verdict(numbers[cell], numbers[reference], higher_is_better=higher_is_better, digits=digits,
                   baseline_name=baseline)


def cell_label(cell: Cell) -> str:
    """A cell's norm and sweep point in words, for tables and keys (never parsed back)."""
    _, norm, sweep = cell
    return f"{norm} ({describe_sweep(sweep)})" if sweep else norm


def cells_of(points: Iterable[Point]) -> list[Cell]:
    """The distinct cells of ``points``, in order of first appearance."""
    return list(dict.fromkeys(p.cell for p in points))


def peak_rss_per_rank(row: dict) -> list[float]:
    """The ``peak_rss_mb/rank<i>`` values of a metrics row in rank order (rank 10 after rank 9)."""
    ranks = {int(k.removeprefix("peak_rss_mb/rank")): v for k, v in row.items() if k.startswith("peak_rss_mb/rank")}
    return [ranks[i] for i in sorted(ranks)]


def median_throughput(rows: list[dict]) -> float:
    speeds = [r["throughput"] for r in rows if "throughput" in r]
    return statistics.median(speeds[1:] or speeds)  # the first logged step includes warm-up


def validation_share(summaries: Iterable[dict[str, Any]], unit: str) -> str:
    """How much of the validation set each validation scored, in words, from the runs' own counts
    (``eval_examples`` of ``eval_examples_available``); empty for runs logged before 2026-12-05."""
    summaries = [s for s in summaries if "diverged_at" not in s]  # no final validation
    counts = sorted({(s["eval_examples"], s["eval_examples_available"]) for s in summaries if "eval_examples" in s})
    if not counts:
        return ""
    shares = " or ".join(f"{scored} of its {available} {unit}" + (" (all)" if scored >= available else "")
                         for scored, available in counts)
    older = sum("eval_examples" not in s for s in summaries)
    return (f"; each validation scored {shares}, spread evenly over them"
            + (f" ({older} run(s) logged before 2026-12-05 give no count)" if older else ""))


class DivergedSummary(dict):
    """The report numbers of a run whose training loss went NaN or infinite: no final validation, so
    every ``eval_*`` number a report asks of it (and its final training loss) is NaN, which reports
    count as not finite (named in the cell, no verdict, ranked last); speed and wall time as
    measured, ``diverged_at`` the step."""

    def __missing__(self, key: str) -> float:
        if key.startswith("eval_"):
            return math.nan
        raise KeyError(key)


def pretraining_summary(run: Run) -> dict[str, Any]:
    """What every recipe reports of a pretraining run: the mean training loss of the last three
    logged steps, the last validation's values (``eval_loss``, and each ``eval/<name>`` as
    ``eval_<name>``), median throughput, peak memory per rank and wall time (a
    :class:`DivergedSummary` for a diverged run)."""
    rows = run.metrics
    if run.diverged is not None:
        logged = any("throughput" in r for r in rows)
        return DivergedSummary(final_train_loss=math.nan, throughput=median_throughput(rows) if logged else math.nan,
                               peak_rss_mb=[], wall_s=run.wall_s, diverged_at=run.diverged["step"])
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    return {
        "final_train_loss": statistics.mean(train[-3:]),
        **{"eval_" + k.removeprefix("eval/"): v for k, v in last_eval.items() if k.startswith("eval/")},
        "throughput": median_throughput(rows),
        "peak_rss_mb": peak_rss_per_rank(rows[-1]),
        "wall_s": run.wall_s,
    }


# ---------------------------------------------------------------- plots


def plot_losses(runs: Sequence[Run], path: Path, ylabel: str) -> None:
    """Training loss (lines) and validation loss (dots) per report cell (norm and sweep point), each
    the mean over that cell's seeds at every step they share: one colour per cell, so a 10-variant,
    3-seed ablation stays readable. The y range leaves out the first tenth of training (the loss
    from ln(vocabulary) down), where every run looks alike. A diverged seed would cut its cell's
    curve at its last step: the mean is over the seeds that trained to the end (the diverged ones
    alone where none did), and the legend counts the diverged ones."""
    plt = pyplot()
    cells: dict[str, list[Run]] = {}
    for run in runs:
        cells.setdefault(run.label, []).append(run)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    shown: list[float] = []
    for label, everyone in cells.items():
        members = [run for run in everyone if run.diverged is None] or everyone
        diverged = sum(run.diverged is not None for run in everyone)
        if diverged:
            label = f"{label}, {diverged} of {len(everyone)} diverged"
        curves = {}
        for key in ("train/loss", "eval/loss"):
            per_run = [{r["step"]: r[key] for r in run.metrics if key in r} for run in members]
            steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
            curves[key] = (steps, [seed_mean([c[step] for c in per_run]) for step in steps])
        seeds = f"{len(members)} seeds" if len(members) > 1 else f"seed {members[0].seed}"
        steps, losses = curves["train/loss"]
        line, = ax.plot(steps, losses, label=f"{label} ({seeds})", alpha=0.85, linewidth=1.2)
        ax.plot(*curves["eval/loss"], "o", color=line.get_color(), markersize=4)
        if steps:
            shown += [v for t, v in zip(steps, losses) if t >= steps[-1] / 10] + curves["eval/loss"][1]
    shown = [v for v in shown if math.isfinite(v)]  # a diverged seed's NaN would decide min / max by its place
    if shown:
        low, high = min(shown), max(shown)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title("lines: training loss; dots: validation loss (means over seeds)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alphas(run: Run, path: Path) -> bool:
    """The paper's alpha figure for one run: per DyT layer, alpha and 1/std of its input over
    training, and every layer's final alpha against its final 1/std; False when the run logged no
    alpha."""
    history = alpha_scale_history(run.metrics)
    if not history:
        return False
    plot_alpha_vs_scale(history, path, title=f"DyT alpha and 1/std of its input per layer ({run.label})")
    return True


def plot_alphas_of_first(runs: Sequence[Run], path: Path) -> bool:
    """The alpha chart of the first run that logged DyT alphas, one that trained to its end first
    (False: none did)."""
    return any(plot_alphas(run, path) for run in sorted(runs, key=lambda run: run.diverged is not None))


# ---------------------------------------------------------------- sweeps in the report


def sweep_section(out: Path, model: ModelSpec, values: dict[Cell, dict[str, list[float]]],
                  metrics: Sequence[Metric], sweeps: Sequence[Sweep]) -> list[str]:
    """The report's sweep part for one model: for every metric and every norm swept over more than
    one point, a table of mean ± std over seeds per grid point and a chart (one key: the metric
    against its values; two keys: a heatmap, rows the first key; more: the table alone), then the
    best point of each norm (not for a test metric: nothing is chosen on test numbers).
    ``values[cell][metric.key]``: the numbers of that cell, one per seed.
    Charts are written into ``out``; returns markdown lines (none without a swept grid)."""
    lines: list[str] = []
    for metric in metrics:
        for norm in dict.fromkeys(c[1] for c in values if c[0] == model.name):
            points = [c for c in values if c[0] == model.name and c[1] == norm and values[c].get(metric.key)]
            mine = [s for s in sweeps if s.applies_to(norm)]
            if len(points) < 2 or not mine:
                continue
            cell_of = {c[2]: values[c][metric.key] for c in points}
            title = f"{model.title}, {norm}: {metric.title} over the sweep (mean ± std over seeds)"
            lines += [f"#### {title}", "", *_sweep_table(mine, cell_of, metric)]
            if len(mine) <= 2:
                png = re.sub(r"[^A-Za-z0-9._-]", "_", f"sweep_{model.name}_{norm}_{metric.key}.png")
                _plot_sweep(out / png, mine, cell_of, metric, title)
                lines += ["", f"![{title}]({png})"]
            if metric.test:
                lines += ["", f"{metric.title} is a test number: no point is chosen on it (choose on a validation "
                              "metric), the table only shows how it moves.", ""]
                continue
            best = (max if metric.higher_is_better else min)(
                cell_of, key=lambda p: ranking_mean(cell_of[p], metric.higher_is_better))
            if not_finite(cell_of[best]):
                lines += ["", f"Best {metric.title} for {norm}: none, every point has seeds that are not finite.", ""]
                continue
            lines += ["", f"Best {metric.title} for {norm}: {describe_sweep(best)} "
                          f"({mean_std(cell_of[best], metric.digits)}, {len(cell_of[best])} seed(s)).", ""]
    return lines


def _sweep_table(sweeps: list[Sweep], cell_of: dict, metric: Metric) -> list[str]:
    """Two keys: a matrix (rows the first key); otherwise one row per point."""
    def cell(point) -> str:
        return mean_std(cell_of[point], metric.digits) if point in cell_of else "-"

    keys = [s.key for s in sweeps]
    if len(keys) == 2:
        rows, cols = sweeps
        lines = [f"| {rows.key} \\ {cols.key} | " + " | ".join(cols.values) + " |",
                 "|---" * (len(cols.values) + 1) + "|"]
        for r in rows.values:
            lines.append(f"| {r} | " + " | ".join(cell(((rows.key, r), (cols.key, c))) for c in cols.values) + " |")
        return lines
    lines = ["| " + " | ".join(keys) + f" | {metric.title} |", "|---" * (len(keys) + 1) + "|"]
    for point in cell_of:
        lines.append("| " + " | ".join(value for _, value in point) + f" | {cell(point)} |")
    return lines


def _plot_sweep(path: Path, sweeps: list[Sweep], cell_of: dict, metric: Metric, title: str) -> None:
    """One key: the metric's mean (± std bars) against the key's values; two: a heatmap of the means."""
    plt = pyplot()
    if len(sweeps) == 1:
        (sweep,) = sweeps
        xs = [v for v in sweep.values if ((sweep.key, v),) in cell_of]
        means = [seed_mean(cell_of[((sweep.key, v),)]) for v in xs]
        errors = [statistics.stdev(cell_of[((sweep.key, v),)])
                  if len(cell_of[((sweep.key, v),)]) > 1 and not not_finite(cell_of[((sweep.key, v),)]) else 0.0
                  for v in xs]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(range(len(xs)), means, yerr=errors, marker="o", capsize=4)
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel(sweep.key)
        ax.set_ylabel(metric.title)
    else:
        rows, cols = sweeps
        grid_means = [[seed_mean(cell_of[((rows.key, r), (cols.key, c))])
                       if ((rows.key, r), (cols.key, c)) in cell_of else float("nan") for c in cols.values]
                      for r in rows.values]
        fig, ax = plt.subplots(figsize=(1.2 * len(cols.values) + 3, 0.8 * len(rows.values) + 2.5))
        image = ax.imshow(grid_means, cmap="viridis" if metric.higher_is_better else "viridis_r", aspect="auto")
        for i, row in enumerate(grid_means):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{value:.{metric.digits}f}", ha="center", va="center", fontsize=8,
                            bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0})
        ax.set_xticks(range(len(cols.values)), cols.values)
        ax.set_yticks(range(len(rows.values)), rows.values)
        ax.set_xlabel(cols.key)
        ax.set_ylabel(rows.key)
        fig.colorbar(image, ax=ax, label=metric.title)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows_with(plan: Sequence[PlannedRun], has: Callable[[Any], bool], what: str,
              title: Callable[[str], str] = str) -> str:
    """A report line saying which rows' runs ``has`` (called with each run's config): for a setting a
    config leaves to the norm kind, which a row's norm name alone does not show. ``title``: a model
    name in words, for comparisons of several models."""
    several = len({p.point.model for p in plan}) > 1

    def row(planned: PlannedRun) -> str:
        return f"{title(planned.point.model)} {planned.point.label}" if several else planned.point.label

    rows = list(dict.fromkeys(row(p) for p in plan))
    having = list(dict.fromkeys(row(p) for p in plan if has(p.config)))
    which = "every row" if having == rows else "no row" if not having else "only " + ", ".join(having)
    return f"{what}: {which}."


CHOSEN_IN_SAMPLE = (
    "A key swept for one norm alone is that norm's tuning: a point of another norm is judged against the "
    "baseline's best point over it, chosen on the same validation numbers the verdict reads, and a best of "
    "several points is favoured by their noise alone; confirm such a verdict on data no point was chosen on "
    "(another corpus, a test set).")


def settings_notes(args: argparse.Namespace, notes: Sequence[str] = ()) -> list[str]:
    """``notes`` (lines said of the whole comparison, e.g. :func:`rows_with`'s), a line of the
    ``--set`` settings every run got over its config (its data among them), and one of what was
    swept; each a paragraph; nothing for what was not given."""
    lines = [line for note in notes for line in (note, "")]
    if args.overrides:
        lines += [f"Set over the config for every run: {', '.join(f'`{item}`' for item in args.overrides)}.", ""]
    if args.sweeps:
        listed = "; ".join(f"{s.norm + ':' if s.norm else ''}{s.key} = {', '.join(s.values)}" for s in args.sweeps)
        lines += [f"Swept: {listed} (every point a run of its own; a key with a norm prefix only in that norm's runs).",
                  ""]
        if any(s.norm for s in args.sweeps):
            lines += [CHOSEN_IN_SAMPLE, ""]
    return lines

