"""The wav2vec 2.0 recipe as the shared comparison and the demo see it (``dyt_wav2vec2.SPEC``)."""

from __future__ import annotations

import statistics
from typing import Any

from dyt.train import load_config
from dyt.train.compare import Run, pretraining_summary
from dyt.train.recipe import Metric, ModelSpec, RecipeSpec

from .model import role_of
from .task import Wav2Vec2PretrainConfig, collapse_reason


def summarize(run: Run) -> dict[str, Any]:
    """The shared pretraining summary, plus steps per second and whether the run collapsed (judged
    with the model settings the run itself saved)."""
    summary = pretraining_summary(run)
    rows = run.metrics
    seconds = [r["step_seconds"] for r in [r for r in rows if "train/loss" in r][1:] if "step_seconds" in r]
    summary.update(steps_per_s=1 / statistics.median(seconds) if seconds else None, collapse=None)
    if run.diverged is None:  # a diverged run has no final validation to judge a collapse by
        last_eval = {k: v for k, v in [r for r in rows if "eval/loss" in r][-1].items() if k.startswith("eval/")}
        model = load_config(Wav2Vec2PretrainConfig, run.dir / "config.yaml", check_files=False).model
        summary["collapse"] = collapse_reason(last_eval, model)
    return summary


SPEC = RecipeSpec(
    name="wav2vec2",
    title="wav2vec 2.0",
    package="dyt_wav2vec2",
    train_module="dyt_wav2vec2.train",
    compare_module="dyt_wav2vec2.compare",
    config_class=Wav2Vec2PretrainConfig,
    models=(ModelSpec("wav2vec2", "wav2vec 2.0", "configs/tiny.yaml", ("layernorm", "dyt")),),
    summarize=summarize,
    metrics=(Metric("eval_contrastive_kept", "validation contrastive loss"),
             Metric("eval_contrastive_accuracy", "contrastive accuracy", higher_is_better=True)),
    role_of=role_of,
    throughput_unit="audio s / s",
)
