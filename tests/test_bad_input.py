"""Bad input gets one clear line, before any heavy work, in every command (docs/errors.md).

Each case runs a command as a user would, in a process of its own, on tiny files under a temporary
folder (no built-in corpus, genome or speech set is built: DYT_CACHE is an empty folder). Every case
must exit with status 2, print no traceback, and end stderr with one line that starts with the
program's name and names the file or key. Alone, each case is mostly Python start-up and imports,
so the cases run two at a time as forks of servers that imported their modules once
(tests/forked_commands.py; a case with an environment of its own starts a fresh interpreter);
every selected case still reports as its own test.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import importlib.metadata
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from dyt.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT_S = 120
"""A case that takes longer has done heavy work it should not have."""
DEBUG_ENV = "DYT_DEBUG"


@dataclass(frozen=True)
class Case:
    name: str
    prog: str
    """The program name the error line starts with."""
    command: tuple[str, ...]
    """``-m module``, a console script, or a script path, then its arguments; ``{tmp}`` is the fixture folder."""
    names: tuple[str, ...]
    """What the last line of stderr must hold: the file, key or option (and what is wrong)."""
    also: tuple[str, ...] = ()
    """What must be elsewhere in stderr (e.g. the reason each left-out file was left out)."""
    env: dict[str, str] = field(default_factory=dict, hash=False)
    """Set for this case (``{tmp}`` is the fixture folder); such a case runs in a fresh interpreter."""
    cwd: str = str(ROOT)
    """Where the command runs (``{tmp}`` is the fixture folder)."""


def _llama(*args):
    return ("-m", "dyt_llama.train", "--config", "recipes/llama/tiny.yaml", "--set", "train.out_dir={tmp}/out",
            "--set", "data.cache_dir={tmp}/cache/llama", "--set", "data.corpus={tmp}/corpus", "--set", "data.validation_works=[b/four]", *args)


def _dna(*args):
    return ("-m", "dyt_dna.train", "--config", "recipes/dna/hyena-tiny.yaml", "--set", "train.out_dir={tmp}/out",
            "--set", "data.cache_dir={tmp}/cache/dna", "--set", "data.validation_fasta=[{tmp}/fasta/held.fa]", *args)


def _w2v(train, *args):
    return ("-m", "dyt_wav2vec2.train", "--config", "recipes/wav2vec2/tiny.yaml", "--set", "train.out_dir={tmp}/out",
            "--set", f"data.train_manifest={{tmp}}/{train}", "--set", "data.validation_manifest={tmp}/valid.tsv", *args)


CASES = [
    # ---- LLaMA training (python -m dyt_llama.train)
    Case("llama-steps-negative", "dyt_llama.train", _llama("--set", "train.steps=-5"),
         ("train.steps", "-5", "at least 1")),
    Case("llama-yaml-syntax", "dyt_llama.train", ("-m", "dyt_llama.train", "--config", "{tmp}/bad.yaml"),
         ("bad.yaml:3:", "invalid YAML")),
    Case("llama-unknown-key", "dyt_llama.train", _llama("--set", "train.stpes=3"), ("train.stpes", "valid keys")),
    Case("llama-seq-len-over-context", "dyt_llama.train", _llama("--set", "data.seq_len=512"),
         ("data.seq_len=512", "model.max_seq_len=256")),
    Case("llama-deepspeed-json-malformed", "dyt_llama.train",
         _llama("--set", "data.cache_dir={tmp}/cache/json-case", "--set", "train.deepspeed_config={tmp}/bad.json"),
         ("bad.json:1:", "invalid JSON", "train.deepspeed_config")),
    Case("llama-deepspeed-json-clash", "dyt_llama.train", _llama("--set", "train.deepspeed_config={tmp}/clash.json"),
         ("clash.json", "train_micro_batch_size_per_gpu", "train.micro_batch_size")),
    Case("llama-deepspeed-json-precision", "dyt_llama.train", _llama("--set", "train.deepspeed_config={tmp}/bf16.json"),
         ("bf16.json", "bf16.enabled=true", "train.precision='fp32'", "one source of truth")),
    Case("llama-resume-model-changed", "dyt_llama.train",
         _llama("--set", "train.out_dir={tmp}/llama-run", "--set", "model.dim=96", "--resume"),
         ("--resume", "model.dim 192 -> 96", 'model.norm.kind "dyt" -> "rmsnorm"', "llama-run/config.yaml")),
    Case("llama-corpus-missing", "dyt_llama.train", _llama("--set", "data.corpus={tmp}/nowhere"),
         ("corpus not found", "nowhere")),
    Case("llama-validation-text-also-trained", "dyt_llama.train", _llama("--set", "data.corpus={tmp}/corpus-copied"),
         ("1 validation document(s) have the text of a training document", "'b/four' = training 'a/four-again'")),
    Case("llama-corpus-not-utf8", "dyt_llama.train", _llama("--set", "data.corpus={tmp}/latin1-corpus"),
         ("latin1.txt", "not UTF-8", "byte 3")),
    Case("llama-tokenizer-not-json", "dyt_llama.train", _llama("--set", "data.tokenizer_file={tmp}/bad.yaml"),
         ("bad.yaml", "data.tokenizer_file")),
    # ---- DNA training (python -m dyt_dna.train)
    Case("dna-fasta-bad-character", "dyt_dna.train", _dna("--set", "data.fasta=[{tmp}/fasta/bad_char.fa]"),
         ("bad_char.fa", "record 'chr2'", "'X' at base 8 (counting from 1)")),
    Case("dna-validation-genome-also-trained", "dyt_dna.train",
         _dna("--set", "data.fasta=[{tmp}/fasta/good.fa,{tmp}/fasta/held-again.fa.gz]"),
         ("data.validation_fasta", "held.fa", "are sequences of data.fasta", "held-again.fa.gz")),
    Case("dna-fasta-no-header", "dyt_dna.train", _dna("--set", "data.fasta=[{tmp}/fasta/no_header.fa]"),
         ("no_header.fa:1", "before the first '>'")),
    Case("dna-fasta-empty", "dyt_dna.train", _dna("--set", "data.fasta=[{tmp}/fasta/empty.fa]"),
         ("empty.fa", "no FASTA records")),
    Case("dna-fasta-missing", "dyt_dna.train", _dna("--set", "data.fasta=[{tmp}/fasta/none.fa]"),
         ("none.fa", "no such FASTA file")),
    Case("dna-no-window-fits", "dyt_dna.train", _dna("--set", "data.fasta=[{tmp}/fasta/short.fa]"),
         ("no window of", "short.fa")),
    Case("dna-validation-fasta-alone", "dyt_dna.train", _dna(),
         ("data.validation_fasta is given without data.fasta",)),
    Case("dna-cache-dir-under-a-file", "dyt_dna.train", _dna("--set", "data.cache_dir={tmp}/bad.yaml/dna"),
         ("data.cache_dir", "bad.yaml is a file")),
    Case("dna-window-over-context", "dyt_dna.train", _dna("--set", "data.window=4096"),
         ("data.window=4096", "model.max_len=512")),
    Case("llama-norm-backend-unknown", "dyt_llama.train", _llama("--set", "model.norm=dyt", "--set", "model.norm.backend=bogus"),
         ("model.norm", "unknown DyT backend 'bogus'")),
    Case("llama-default-backend-unknown", "dyt_llama.train", _llama("--set", "model.norm=dyt"),
         ("DYT_BACKEND", "unknown DyT backend 'bogus'"), env={"DYT_BACKEND": "bogus"}),
    Case("llama-seed-too-large", "dyt_llama.train", _llama("--set", "train.seed=99999999999999999999"),
         ("train.seed", "from 0 to 4294967295")),
    Case("llama-lr-infinite", "dyt_llama.train", _llama("--set", "train.lr=.inf"), ("train.lr", "not a finite number")),
    Case("llama-norm-eps-negative", "dyt_llama.train", _llama("--set", "model.norm.eps=-1"),
         ("model.norm", "eps must be a positive number")),
    Case("llama-alpha-init-nan", "dyt_llama.train", _llama("--set", "model.norm=dyt", "--set", "model.norm.alpha_init.ffn=.nan"),
         ("alpha_init.ffn", "positive number")),
    Case("llama-out-dir-under-a-file", "dyt_llama.train", _llama("--set", "train.out_dir={tmp}/bad.yaml/run"),
         ("train.out_dir", "bad.yaml is a file, not a folder")),
    Case("llama-out-dir-empty", "dyt_llama.train", _llama("--set", "train.out_dir="), ("train.out_dir is empty",)),
    Case("llama-resume-data-changed", "dyt_llama.train",
         _llama("--set", "train.out_dir={tmp}/llama-run-data", "--set", "model.norm=dyt", "--resume"),
         ("llama-run-data", "the data files it trained on changed since", "4 files", "start a new run")),
    Case("llama-compare-data-changed", "dyt-llama-compare",
         ("dyt-llama-compare", "--out", "{tmp}/cmp-data", "--set", "data.cache_dir={tmp}/cache/llama",
          "--set", "data.corpus={tmp}/corpus", "--set", "data.validation_works=[b/four]"),
         ("llama-rmsnorm-seed0", "the data files it trained on changed since", "--fresh")),
    Case("llama-resume-config-missing", "dyt_llama.train",
         _llama("--set", "train.out_dir={tmp}/llama-run-no-config", "--resume"),
         ("llama-run-no-config/config.yaml is missing beside the run's checkpoints", "launches.jsonl")),
    Case("llama-config-given-twice", "dyt_llama.train",
         ("-m", "dyt_llama.train", "--config", "recipes/llama/tiny.yaml", "--config", "recipes/llama/125m.yaml"),
         ("--config", "given twice", "not merged")),
    Case("llama-config-empty", "dyt_llama.train", ("-m", "dyt_llama.train", "--config", "{tmp}/empty.yaml"),
         ("empty.yaml holds no settings", "write {} in it")),
    Case("llama-resume-damaged-marker", "dyt_llama.train",
         _llama("--set", "train.out_dir={tmp}/llama-run-bad-marker", "--set", "model.norm=dyt", "--resume"),
         ("checkpoint error", "step_00000001/COMPLETE", "not a checkpoint marker")),
    # ---- wav2vec 2.0 pretraining (python -m dyt_wav2vec2.train)
    Case("w2v-heads-do-not-divide-dim", "dyt_wav2vec2.train",
         ("-m", "dyt_wav2vec2.train", "--config", "recipes/wav2vec2/tiny.yaml", "--set", "model.heads=5"),
         ("dim (64) must divide by heads (5)",)),
    Case("w2v-conv-layers-malformed", "dyt_wav2vec2.train",
         ("-m", "dyt_wav2vec2.train", "--config", "recipes/wav2vec2/tiny.yaml", "--set", "model.conv_layers=[[64,10]]"),
         ("conv_layers", "[channels, kernel, stride]")),
    Case("w2v-dropout-out-of-range", "dyt_wav2vec2.train",
         ("-m", "dyt_wav2vec2.train", "--config", "recipes/wav2vec2/tiny.yaml", "--set", "model.dropout=7"),
         ("model.dropout", "from 0 to 1")),
    Case("w2v-train-truncated-wav", "dyt_wav2vec2.train", _w2v("train_truncated.tsv"),
         ("training audio", "trunc.wav", "truncated", "header promises 16000 samples")),
    Case("w2v-train-stereo-wav", "dyt_wav2vec2.train", _w2v("train_stereo.tsv"),
         ("training audio", "stereo.wav", "2 channels")),
    Case("w2v-train-all-too-short", "dyt_wav2vec2.train", _w2v("train_short.tsv"),
         ("training audio", "3 of 3 files are shorter than 10560 samples", "short0.wav")),
    Case("w2v-validation-audio-also-trained", "dyt_wav2vec2.train", _w2v("train_with_a_copy.tsv"),
         ("validation audio", "1 of 1 files are also training audio", "good2.wav = ", "copy_of_good2.wav")),
    # ---- the manifest tool (python -m dyt_wav2vec2.manifest)
    Case("manifest-truncated-wav", "dyt_wav2vec2.manifest",
         ("-m", "dyt_wav2vec2.manifest", "{tmp}/audio-truncated", "{tmp}/out-truncated.tsv"),
         ("out-truncated.tsv lists 2 of 3 files", "trunc.wav"), ("trunc.wav: truncated",)),
    Case("manifest-stereo-wav", "dyt_wav2vec2.manifest",
         ("-m", "dyt_wav2vec2.manifest", "{tmp}/audio-stereo", "{tmp}/out-stereo.tsv"),
         ("out-stereo.tsv lists 2 of 3 files", "stereo.wav"), ("stereo.wav: 2 channels",)),
    Case("manifest-out-is-a-folder", "dyt_wav2vec2.manifest",
         ("-m", "dyt_wav2vec2.manifest", "{tmp}/audio-stereo", "{tmp}/fasta"), ("fasta is a folder",)),
    Case("manifest-no-folder", "dyt_wav2vec2.manifest",
         ("-m", "dyt_wav2vec2.manifest", "{tmp}/nowhere", "{tmp}/out.tsv"), ("nowhere", "no such folder")),
    # ---- evals
    Case("dna-eval-weights-damaged", "dyt_dna.eval",
         ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/task-ok", "--seeds", "0"),
         ("step_00000001 is marked complete but its weights do not load", "Ran out of input")),
    Case("dna-eval-config-not-the-weights", "dyt_dna.eval",
         ("-m", "dyt_dna.eval", "--run", "{tmp}/run-mismatch", "--task", "{tmp}/task-ok", "--seeds", "0"),
         ("run-mismatch", "weights do not fit the model its config.yaml builds", "Missing key(s)", "edited")),
    Case("dna-eval-per-class-with-a-task-folder", "dyt_dna.eval",
         ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/task-ok", "--per-class", "5"),
         ("--per-class", "task-ok is a task folder, whose files decide them")),
    Case("dna-eval-mistyped-task-with-per-class", "dyt_dna.eval",  # the name first, not "a task folder"
         ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "speceis", "--per-class", "5"),
         ("task 'speceis'", "not a built-in task")),
    Case("dna-compare-eval-window-with-task-folders", "dyt-dna-compare",
         ("dyt-dna-compare", "--out", "{tmp}/cmp", "--tasks", "{tmp}/task-ok", "--eval-window", "64"),
         ("--eval-window", "task-ok is a task folder")),
    Case("dna-eval-task-folder-of-neither-layout", "dyt_dna.eval",
         ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/foreign"),
         ("foreign: no train/ folder", "<class>/*.txt", "train.csv, dev.csv and test.csv")),
    Case("dna-fasta-is-a-folder", "dyt_dna.train", _dna("--set", "data.fasta=[{tmp}/fasta]"),
         ("fasta: a folder, not a FASTA file",)),
    Case("dna-eval-out-is-a-folder", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--out", "{tmp}/fasta"),
         ("--out", "fasta is a folder")),
    Case("dna-eval-csv-unquoted-comma", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/csv-comma"),
         ("train.csv line 3", "3 fields, the header has 2")),
    Case("dna-eval-csv-header-only", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/csv-empty"),
         ("csv-empty", "the train split has no examples")),
    Case("dna-eval-csv-one-class", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/csv-one-class"),
         ("csv-one-class", "at least two classes")),
    Case("dna-eval-csv-unseen-label", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/csv-unseen"),
         ("csv-unseen", "test labels ['c'] never occur in training")),
    Case("dna-eval-checkpoint-without-weights", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run-no-weights"),
         ("run error", "step_00000001", "holds no model states")),
    Case("dna-eval-no-run", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/nowhere", "--task", "{tmp}/csv"),
         ("nowhere", "no such run directory")),
    Case("dna-eval-untrained-run", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run-untrained"),
         ("run-untrained", "no complete checkpoint")),
    Case("dna-eval-csv-column", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--task", "{tmp}/csv"),
         ("dev.csv", "missing column(s) ['sequence']")),
    Case("dna-eval-eval-window-over-context", "dyt_dna.eval",
         ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--eval-window", "100000"), ("--eval-window", "longer than a model's context")),
    Case("dna-eval-epochs-zero", "dyt_dna.eval", ("-m", "dyt_dna.eval", "--run", "{tmp}/run", "--epochs", "0"),
         ("--epochs", "at least 1")),
    Case("w2v-eval-no-run", "dyt_wav2vec2.eval", ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/nowhere"),
         ("nowhere", "no such run directory")),
    Case("w2v-eval-data-is-a-file", "dyt_wav2vec2.eval",
         ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/run", "--data", "{tmp}/valid.tsv"),
         ("--data", "valid.tsv: a file, not a folder", "leave --data out")),
    Case("w2v-eval-steps-zero", "dyt_wav2vec2.eval", ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/run", "--steps", "0"),
         ("--steps", "at least 1")),
    # ---- the compare commands
    Case("llama-compare-yaml-syntax", "dyt-llama-compare",
         ("dyt-llama-compare", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/cmp"), ("bad.yaml:3:", "invalid YAML")),
    Case("llama-compare-corpus-missing", "dyt-llama-compare",
         ("dyt-llama-compare", "--out", "{tmp}/cmp", "--set", "data.corpus={tmp}/nowhere"), ("corpus not found", "nowhere")),
    Case("dna-compare-config-missing", "dyt-dna-compare",
         ("dyt-dna-compare", "--configs", "{tmp}/none.yaml", "--out", "{tmp}/cmp"), ("config file not found", "none.yaml")),
    Case("dna-compare-task-missing", "dyt-dna-compare",
         ("dyt-dna-compare", "--tasks", "{tmp}/none", "--out", "{tmp}/cmp", "--set", "data.fasta=[{tmp}/fasta/good.fa]",
          "--set", "data.validation_fasta=[{tmp}/fasta/held.fa]"), ("task", "none", "nor a folder")),
    Case("llama-compare-out-is-a-file", "dyt-llama-compare", ("dyt-llama-compare", "--out", "{tmp}/bad.yaml"),
         ("--out", "bad.yaml is a file, not a folder")),
    Case("llama-compare-sweep-of-the-norm", "dyt-llama-compare",
         ("dyt-llama-compare", "--out", "{tmp}/cmp", "--sweep", "model.norm=dyt,layernorm"),
         ("--sweep", "model.norm is what each --norms entry sets")),
    Case("llama-compare-set-norm-kind", "dyt-llama-compare",
         ("dyt-llama-compare", "--out", "{tmp}/cmp", "--set", "model.norm.kind=dyt"),
         ("--set", "model.norm.kind is what each --norms entry sets")),
    Case("llama-compare-seed-twice", "dyt-llama-compare", ("dyt-llama-compare", "--out", "{tmp}/cmp", "--seeds", "0", "0"),
         ("--seeds", "listed twice")),
    Case("llama-compare-seeds-option-twice", "dyt-llama-compare",  # argparse kept the last: seed 2 alone
         ("dyt-llama-compare", "--out", "{tmp}/cmp", "--seeds", "0", "1", "--seeds", "2"),
         ("--seeds", "given twice: list every value after one --seeds")),
    Case("dna-compare-tasks-of-one-name", "dyt-dna-compare",
         ("dyt-dna-compare", "--out", "{tmp}/cmp", "--tasks", "{tmp}/csv", "{tmp}/csv-comma/../csv"),
         ("--tasks", "both named 'csv'")),
    Case("dna-compare-sweep-of-the-model", "dyt-dna-compare",
         ("dyt-dna-compare", "--out", "{tmp}/cmp", "--sweep", "model.arch=hyena,caduceus"),
         ("--sweep", "model.arch is the model each --configs file builds")),
    Case("dna-compare-eval-window-over-context", "dyt-dna-compare",
         ("dyt-dna-compare", "--out", "{tmp}/cmp", "--eval-window", "100000"), ("--eval-window", "longer than a model's context")),
    Case("w2v-compare-ctc-option-without-ctc", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--evals", "contrastive", "probe", "--ctc-steps", "100"),
         ("--ctc-steps", "an eval that --evals contrastive probe does not run")),
    Case("w2v-eval-keyword-steps-without-keywords", "dyt_wav2vec2.eval",
         ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/run", "--evals", "ctc", "--steps", "10", "--ctc-mask-time", "0.1"),
         ("--steps set(s) an eval that --evals ctc does not run",)),  # the CTC masking is CTC's own: accepted
    Case("w2v-eval-keyword-steps-at-default-without-keywords", "dyt_wav2vec2.eval",  # given, though at the default
         ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/run", "--evals", "ctc", "--steps", "150"),
         ("--steps set(s) an eval that --evals ctc does not run",)),
    Case("w2v-eval-evals-twice", "dyt_wav2vec2.eval", ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/run", "--evals", "probe", "probe"),
         ("--evals", "probe is listed twice")),
    Case("dna-compare-too-little-data", "dyt-dna-compare",
         ("dyt-dna-compare", "--out", "{tmp}/cmp", "--configs", "recipes/dna/hyena-tiny.yaml", "--tasks", "{tmp}/csv-good",
          "--set", "data.fasta=[{tmp}/fasta/good.fa]", "--set", "data.validation_fasta=[{tmp}/fasta/held.fa]",
          "--set", "data.cache_dir={tmp}/cache/dna-compare"),
         ("4 examples", "fewer than one step's batch (4 x 2 rank(s) = 8)")),
    Case("dna-compare-one-model-twice", "dyt-dna-compare",
         ("dyt-dna-compare", "--out", "{tmp}/cmp", "--configs", "recipes/dna/hyena-tiny.yaml", "recipes/dna/hyena-tiny.yaml"),
         ("--configs", "both hyena models")),
    Case("llama-compare-nproc-zero", "dyt-llama-compare", ("dyt-llama-compare", "--out", "{tmp}/cmp", "--nproc", "0"),
         ("--nproc", "at least 1")),
    Case("dna-compare-fresh-deletes-cwd", "dyt-dna-compare", ("dyt-dna-compare", "--out", "{tmp}/cmp-fresh", "--fresh"),
         ("--fresh", "cmp-fresh", "holds the current directory"), cwd="{tmp}/cmp-fresh/inner"),
    Case("llama-compare-fresh-foreign-folder", "dyt-llama-compare", ("dyt-llama-compare", "--out", "{tmp}/foreign", "--fresh"),
         ("--fresh", "foreign holds files that no comparison wrote")),
    Case("llama-compare-out-empty", "dyt-llama-compare", ("dyt-llama-compare", "--out", ""), ("--out", "an empty path")),
    Case("w2v-compare-cache-is-a-file", "dyt-wav2vec2-compare", ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--evals", "none"),
         ("cache folder", "bad.yaml", "a file stands at it"), env={"DYT_CACHE": "{tmp}/bad.yaml"}),
    Case("speech-cache-is-a-file", "dyt_wav2vec2.speech", ("-m", "dyt_wav2vec2.speech"),
         ("cache folder", "bad.yaml", "a file stands at it"), env={"DYT_CACHE": "{tmp}/bad.yaml"}),
    Case("w2v-compare-deepspeed-json", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--set", "train.deepspeed_config={tmp}/bad.json"),
         ("bad.json:1:", "invalid JSON")),
    Case("llama-compare-validation-off", "dyt-llama-compare",
         ("dyt-llama-compare", "--out", "{tmp}/cmp", "--set", "train.eval_every=0"),
         ("train.eval_every=0 turns validation off", "give a positive train.eval_every")),
    Case("llama-compare-backend-not-here", "dyt-llama-compare", ("dyt-llama-compare", "--out", "{tmp}/cmp"),
         ("DYT_BACKEND", "fused", "need a CUDA device"), env={"DYT_BACKEND": "fused", "TRITON_INTERPRET": "0"}),
    Case("w2v-compare-alpha-role-not-built", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--sweep", "dyt:model.norm.alpha_init.ffn=1,2"),
         ("norm.alpha_init.ffn", "wav2vec 2.0 has no norm of role 'ffn'")),
    Case("w2v-compare-no-evals-and-evals", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--evals", "none", "probe"), ("--evals none", "give it alone")),
    Case("w2v-compare-no-evals-with-eval-options", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--evals", "none", "--seeds", "4", "--ctc-lr", "0.1"),
         ("--seeds, --ctc-lr set the downstream evals", "--evals none runs none")),
    Case("w2v-compare-no-evals-with-default-eval-options", "dyt-wav2vec2-compare",  # abbreviated, at the defaults
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--evals", "none", "--ctc-sched", "tri-stage", "--seeds", "0", "1", "2"),
         ("--seeds, --ctc-schedule set the downstream evals", "--evals none runs none")),
    Case("w2v-compare-no-evals-with-device", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--evals", "none", "--device", "cpu"),
         ("--device set the downstream evals", "--evals none runs none")),
    Case("w2v-eval-device-not-here", "dyt_wav2vec2.eval",
         ("-m", "dyt_wav2vec2.eval", "--run", "{tmp}/no-run", "--device", "cuda:1"),
         ("argument --device", "cuda:1: CUDA is not available on this machine; use cpu"), env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("dna-compare-device-not-a-device", "dyt-dna-compare", ("dyt-dna-compare", "--out", "{tmp}/cmp", "--device", "gpu"),
         ("argument --device", "'gpu' is not a device: give auto, cpu, cuda or cuda:N")),
    Case("w2v-compare-own-audio-without-apt-get", "dyt-wav2vec2-compare",
         ("dyt-wav2vec2-compare", "--out", "{tmp}/cmp", "--set", "data.train_manifest={tmp}/train_short.tsv",
          "--set", "data.validation_manifest={tmp}/valid.tsv"),
         ("no apt-get", "the downstream evals run on the built-in speech", "--evals none"), env={"PATH": str(BIN)}),
    # ---- dyt-llama-prepare: corpus folders it cannot read as documents
    Case("prepare-corpus-mixed-kinds", "dyt-llama-prepare",
         ("dyt-llama-prepare", "--config", "recipes/llama/tiny.yaml", "--set", "data.corpus={tmp}/corpus-mixed",
          "--set", "data.cache_dir={tmp}/cache/prepare"), ("corpus-mixed", "holds both .txt files")),
    Case("prepare-jsonl-malformed", "dyt-llama-prepare",
         ("dyt-llama-prepare", "--config", "recipes/llama/tiny.yaml", "--set", "data.corpus={tmp}/corpus-bad-json",
          "--set", "data.cache_dir={tmp}/cache/prepare"), ("corpus-bad-json", "do not read as one table")),
    Case("prepare-jsonl-text-not-strings", "dyt-llama-prepare",
         ("dyt-llama-prepare", "--config", "recipes/llama/tiny.yaml", "--set", "data.corpus={tmp}/corpus-numbers",
          "--set", "data.cache_dir={tmp}/cache/prepare"), ("corpus-numbers", "'text' column holds int64")),
    Case("prepare-corpus-is-a-file", "dyt-llama-prepare",
         ("dyt-llama-prepare", "--config", "recipes/llama/tiny.yaml", "--set", "data.corpus={tmp}/bad.yaml",
          "--set", "data.cache_dir={tmp}/cache/prepare"), ("bad.yaml is a file",)),
    Case("prepare-vocab-below-bytes", "dyt-llama-prepare",
         ("dyt-llama-prepare", "--config", "recipes/llama/tiny.yaml", "--set", "data.corpus={tmp}/corpus",
          "--set", "model.vocab_size=100", "--set", "data.cache_dir={tmp}/cache/prepare"),
         ("model.vocab_size=100", "below the 257 tokens")),
    # ---- dyt-bench, dyt-llama-bench and the corpus builder
    Case("bench-block-size", "dyt-bench", ("dyt-bench", "--block", "--block-size", "30,4,64,16"),
         ("--block-size", "DIM (30)")),
    Case("bench-repeats-zero", "dyt-bench", ("dyt-bench", "--repeats", "0"), ("--repeats", "at least 1")),
    Case("bench-backend-unknown", "dyt-bench", ("dyt-bench",), ("DYT_BACKEND", "unknown DyT backend 'bogus'"),
         env={"DYT_BACKEND": "bogus"}),
    Case("bench-training-allocator-chosen", "dyt-bench", ("dyt-bench", "--training-allocator"),
         ("--training-allocator", "MALLOC_MMAP_THRESHOLD_ is set in the environment"),
         env={"MALLOC_MMAP_THRESHOLD_": "131072"}),
    Case("llama-bench-config-missing", "dyt-llama-bench", ("dyt-llama-bench", "--config", "{tmp}/missing.yaml"),
         ("--config", "missing.yaml", "not a file")),
    Case("llama-bench-dna-recipe", "dyt-llama-bench", ("dyt-llama-bench", "--config", "recipes/dna/hyena-tiny.yaml"),
         ("model.arch",)),
    Case("llama-bench-backend-unknown", "dyt-llama-bench", ("dyt-llama-bench",),
         ("DYT_BACKEND", "unknown DyT backend 'bogus'"), env={"DYT_BACKEND": "bogus"}),
    Case("corpus-out-is-a-file", "dyt_llama.corpus", ("-m", "dyt_llama.corpus", "--out", "{tmp}/bad.yaml"),
         ("bad.yaml", "not a folder")),
    Case("corpus-out-under-a-file", "dyt_llama.corpus", ("-m", "dyt_llama.corpus", "--out", "{tmp}/bad.yaml/sub"),
         ("--out", "bad.yaml is a file, not a folder")),
    Case("speech-out-is-a-file", "dyt_wav2vec2.speech", ("-m", "dyt_wav2vec2.speech", "--out", "{tmp}/bad.yaml"),
         ("--out", "bad.yaml is a file, not a folder")),
    # ---- built-in data on a machine without apt-get (PATH holds only the venv's programs)
    Case("kjv-without-apt-get", "dyt_llama.corpus", ("-m", "dyt_llama.corpus", "--kjv", "--out", "{tmp}/kjv"),
         ("data error", "bible-kjv", "no apt-get"), env={"PATH": str(BIN)}),
    Case("speech-without-apt-get", "dyt_wav2vec2.speech", ("-m", "dyt_wav2vec2.speech", "--out", "{tmp}/speech"),
         ("espeak-ng", "no apt-get", "your own data"), env={"PATH": str(BIN)}),
    Case("genomes-without-apt-get", "dyt_dna.train", ("-m", "dyt_dna.train", "--config", "recipes/dna/hyena-tiny.yaml",
                                                      "--set", "train.out_dir={tmp}/out-genomes"),
         ("data error", "ragout-examples", "no apt-get"), env={"PATH": str(BIN)}),
]
if not torch.cuda.is_available():
    CASES.append(Case("llama-fp16-without-cuda", "dyt_llama.train", _llama("--set", "train.precision=fp16"),
                      ("train.precision='fp16'", "needs a CUDA GPU")))
    CASES.append(Case("llama-fused-backend-without-cuda", "dyt_llama.train",
                      _llama("--set", "model.norm=dyt", "--set", "model.norm.backend=fused"),
                      ("model.norm.backend", "'fused' cannot run on cpu"), env={"TRITON_INTERPRET": "0"}))
    CASES.append(Case("bench-no-cuda", "dyt-bench", ("dyt-bench", "--device", "cuda"), ("--device", "CUDA is not available")))
    CASES.append(Case("selfcheck-no-cuda", "python -m dyt.selfcheck", ("-m", "dyt.selfcheck", "--device", "cuda"),
                      ("--device", "CUDA is not available")))
    CASES.append(Case("selfcheck-fused-on-cpu", "python -m dyt.selfcheck",
                      ("-m", "dyt.selfcheck", "--device", "cpu", "--backend", "fused"),
                      ("--backend", "'fused' cannot run on cpu", "Usable here: cpu"), env={"TRITON_INTERPRET": "0"}))
CASES.append(Case("demo-out-is-a-file", "demo.py", ("scripts/demo.py", "--out", "{tmp}/bad.yaml"),
                  ("--out", "bad.yaml is a file, not a folder")))


# ---------------------------------------------------------------- the tiny inputs

def _wav(path: Path, samples: int = 16000, channels: int = 1, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).normal(0, 0.1, (samples, channels)).astype(np.float32)
    soundfile.write(str(path), noise, 16000, subtype="PCM_16")


def _truncated_wav(path: Path) -> None:
    """A WAV whose header promises 16000 samples and whose data stops after 8."""
    _wav(path)
    path.write_bytes(path.read_bytes()[: 44 + 16])


def _manifest(path: Path, root: Path, files: list[str]) -> None:
    path.write_text("\n".join([str(root)] + [f"{name}\t16000" for name in files]) + "\n")


def _inputs(tmp: Path) -> None:
    for corpus, names in ((tmp / "corpus", ("a/one", "a/two", "b/three", "b/four")),
                          (tmp / "corpus-copied", ("a/one", "a/two", "b/four"))):
        for name in names:
            (corpus / f"{name}.txt").parent.mkdir(parents=True, exist_ok=True)
            (corpus / f"{name}.txt").write_text(f"Shall I compare thee to a summer's day? ({name}) " * 20)
    # a copy saved by another editor: a byte-order mark before it, a newline after it
    (tmp / "corpus-copied" / "a" / "four-again.txt").write_text(
        "\ufeff" + (tmp / "corpus-copied" / "b" / "four.txt").read_text() + "\n", encoding="utf-8")
    (tmp / "cmp-fresh" / "inner").mkdir(parents=True)
    (tmp / "cmp-fresh" / "inner" / "keep.txt").write_text("not to be deleted\n")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "keep.txt").write_text("not to be deleted\n")
    for name, files in (("corpus-mixed", {"a.txt": "some words\n", "b.jsonl": '{"text": "more words"}\n'}),
                        ("corpus-bad-json", {"x.jsonl": '{"text": "fine"}\n{not json\n'}),
                        ("corpus-numbers", {"x.jsonl": '{"text": 5}\n{"text": 6}\n'})):
        (tmp / name).mkdir()
        for file, text in files.items():
            (tmp / name / file).write_text(text)
    latin = tmp / "latin1-corpus"
    latin.mkdir()
    (latin / "good.txt").write_text("plain text\n")
    (latin / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp / "bad.yaml").write_text("train:\n  steps: [1\n")
    (tmp / "bad.json").write_text('{"zero_optimization": {"stage": 2},, "bf16": {"enabled": true}}\n')
    (tmp / "clash.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    (tmp / "bf16.json").write_text(json.dumps({"bf16": {"enabled": True}}))

    fasta = tmp / "fasta"
    fasta.mkdir()
    bases = "".join(np.random.default_rng(0).choice(list("ACGT"), 3000))
    (fasta / "good.fa").write_text(f">chr1\n{bases[:1500]}\n>chr2\n{bases[1500:]}\n")
    held = "".join(np.random.default_rng(1).choice(list("ACGT"), 3000))  # a file of its own for validation
    (fasta / "held.fa").write_text(f">chr1\n{held[:1500]}\n>chr2\n{held[1500:]}\n")
    with gzip.open(fasta / "held-again.fa.gz", "wt") as twin:  # the held-out genome, gzipped, among the training files
        twin.write(f">chr1 other header\n{held[:1500].lower()}\n>chr2\n{held[1500:]}\n")
    (fasta / "bad_char.fa").write_text(f">chr1 first\n{bases[:600]}\n>chr2\nACGTACGXACGT{bases[600:1200]}\n")
    (fasta / "no_header.fa").write_text(f"{bases[:600]}\n")
    (fasta / "empty.fa").write_text("")
    (fasta / "short.fa").write_text(f">tiny\n{bases[:50]}\n")

    audio = tmp / "audio"
    for i in range(3):
        _wav(audio / f"good{i}.wav", seed=i)
        _wav(audio / f"short{i}.wav", samples=4000, seed=i)
    _truncated_wav(audio / "trunc.wav")
    _wav(audio / "stereo.wav", channels=2)
    _manifest(tmp / "valid.tsv", audio, ["good2.wav"] * 4)
    _manifest(tmp / "train_truncated.tsv", audio, ["good0.wav", "good1.wav", "trunc.wav"])
    _manifest(tmp / "train_stereo.tsv", audio, ["good0.wav", "good1.wav", "stereo.wav"])
    _manifest(tmp / "train_short.tsv", audio, ["short0.wav", "short1.wav", "short2.wav"])
    shutil.copy(audio / "good2.wav", audio / "copy_of_good2.wav")  # the validation recording, copied into training
    _manifest(tmp / "train_with_a_copy.tsv", audio, ["good0.wav", "good1.wav", "copy_of_good2.wav"])
    for name, bad in (("audio-truncated", _truncated_wav), ("audio-stereo", lambda p: _wav(p, channels=2))):
        _wav(tmp / name / "good0.wav")
        _wav(tmp / name / "sub" / "good1.wav", seed=1)
        bad(tmp / name / ("trunc.wav" if name == "audio-truncated" else "stereo.wav"))

    from dyt.train import dump_yaml, load_config
    from dyt.train.data_files import files_signature
    from dyt_llama.task import LlamaConfig

    # A LLaMA run trained with DyT (its config.yaml and a checkpoint marker: the check comes first).
    overrides = [arg.replace("{tmp}", str(tmp)) for flag, arg in zip(_llama(), _llama()[1:]) if flag == "--set"]
    llama_run = tmp / "llama-run"
    (llama_run / "checkpoints/step_00000001").mkdir(parents=True)
    (llama_run / "checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 1}')
    (llama_run / "config.yaml").write_text(dump_yaml(load_config(
        LlamaConfig, ROOT / "recipes/llama/tiny.yaml", [*overrides, "model.norm=dyt", f"train.out_dir={llama_run}"])))
    # The same run, as if trained on the corpus before one of its files was rewritten (a digest of
    # other times); and a comparison's finished run the same way.
    changed = tmp / "llama-run-data"
    (changed / "checkpoints/step_00000001").mkdir(parents=True)
    (changed / "checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 1}')
    (changed / "config.yaml").write_text(dump_yaml(load_config(
        LlamaConfig, ROOT / "recipes/llama/tiny.yaml", [*overrides, "model.norm=dyt", f"train.out_dir={changed}"])))
    stale = {**files_signature([tmp / "corpus"]), "digest": "0123456789abcdef"}
    (changed / "data_files.json").write_text(json.dumps(stale))
    (tmp / "cmp-data/llama-rmsnorm-seed0/checkpoints/step_00000001").mkdir(parents=True)  # a run with a checkpoint
    (tmp / "cmp-data/llama-rmsnorm-seed0/checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 2}')
    (tmp / "cmp-data/llama-rmsnorm-seed0/data_files.json").write_text(json.dumps(stale))
    (tmp / "cmp-data/llama-rmsnorm-seed0/config.yaml").write_text(dump_yaml(load_config(  # as the comparison plans it
        LlamaConfig, ROOT / "recipes/llama/tiny.yaml",
        [*overrides, "model.norm=rmsnorm", f"train.out_dir={tmp / 'cmp-data/llama-rmsnorm-seed0'}"])))
    damaged = tmp / "llama-run-bad-marker"
    (damaged / "checkpoints/step_00000001").mkdir(parents=True)
    (damaged / "checkpoints/step_00000001/COMPLETE").write_text("garbage{")
    (damaged / "config.yaml").write_text((llama_run / "config.yaml").read_text())
    from dyt_dna.task import DnaConfig

    config = dump_yaml(load_config(DnaConfig, ROOT / "recipes/dna/hyena-tiny.yaml"))
    for run in ("run", "run-untrained"):
        (tmp / run).mkdir()
        (tmp / run / "config.yaml").write_text(config)
    (tmp / "run/checkpoints/step_00000001").mkdir(parents=True)  # complete as far as the checks go;
    (tmp / "run/checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 1}')  # never loaded
    (tmp / "run/checkpoints/step_00000001/mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp / "run-no-weights/checkpoints/step_00000001").mkdir(parents=True)  # marked complete, weights missing
    (tmp / "run-no-weights/checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 1}')
    (tmp / "run-no-weights/config.yaml").write_text(config)
    # trained weights of a one-layer model beside the config of the recipe's model
    from dyt_dna.task import build_model

    one_layer = load_config(DnaConfig, ROOT / "recipes/dna/hyena-tiny.yaml", ["model.layers=1"])
    (tmp / "run-mismatch/checkpoints/step_00000001").mkdir(parents=True)
    (tmp / "run-mismatch/checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 1}')
    torch.save({"module": build_model(one_layer.model).state_dict()},
               tmp / "run-mismatch/checkpoints/step_00000001/mp_rank_00_model_states.pt")
    (tmp / "run-mismatch/config.yaml").write_text(config)
    for split, offset in (("train", 0), ("test", 40)):  # a task that loads: 2 classes of 4 files
        for label, letters in (("a", "ACGT"), ("b", "GGCA")):
            (tmp / "task-ok" / split / label).mkdir(parents=True)
            for i in range(4):
                (tmp / "task-ok" / split / label / f"{i}.txt").write_text((letters * 8)[i:] + bases[offset + i:][:20])
    no_config = tmp / "llama-run-no-config"  # its config.yaml lost (deleted, or a copy in part)
    (no_config / "checkpoints/step_00000001").mkdir(parents=True)
    (no_config / "checkpoints/step_00000001/COMPLETE").write_text('{"step": 1, "world_size": 1}')
    (tmp / "empty.yaml").write_text("# nothing but a comment\n")
    csv = tmp / "csv"
    csv.mkdir()
    for split in ("train", "test"):
        (csv / f"{split}.csv").write_text("sequence,label\nACGTACGT,a\nTTGGCCAA,b\n")
    (csv / "dev.csv").write_text("seq,label\nACGT,a\n")
    good_rows = "sequence, label\nACGTACGT,a\nTTGGCCAA,b\nACGTTTGG,a\n"  # a space after the comma: still read
    for name, train, test in (("csv-comma", "sequence,label\nACGTACGT,a\nTTGGCCAA,b,c\n", good_rows),
                              ("csv-empty", "sequence,label\n", good_rows),
                              ("csv-one-class", "sequence,label\nACGTACGT,a\nTTGGCCAA,a\n", good_rows),
                              ("csv-unseen", good_rows, good_rows + "GGGGCCCC,c\n"),
                              ("csv-good", good_rows, good_rows)):
        (tmp / name).mkdir()
        (tmp / name / "train.csv").write_text(train)
        (tmp / name / "dev.csv").write_text(good_rows)
        (tmp / name / "test.csv").write_text(test)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", DEBUG_ENV)}
    env.update(DYT_CACHE=str(tmp / "dyt-cache"), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT / "tests"))
    return env



def _argv(command: tuple[str, ...], tmp: Path) -> list[str]:
    args = [part.replace("{tmp}", str(tmp)) for part in command]
    if args[0] == "-m" or args[0].endswith(".py"):
        return [sys.executable, *args]
    return [str(BIN / args[0]), *args[1:]]


def _run(case: Case, tmp: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(_argv(case.command, tmp), cwd=case.cwd.replace("{tmp}", str(tmp)),
                              env={**_env(tmp), **{k: v.replace("{tmp}", str(tmp)) for k, v in case.env.items()}},
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(expired.cmd, -1, expired.stdout or "", f"timed out after {TIMEOUT_S} s")


class ForkedCommands:
    """A tests/forked_commands.py server: cases run as forks of a process that imported their
    modules once (each case's own process, exit status and stderr; see that file for what differs)."""

    def __init__(self, tmp: Path, modules: list[str]):
        self.tmp = tmp
        self.server = subprocess.Popen([sys.executable, str(ROOT / "tests/forked_commands.py"), *modules],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(tmp), cwd=ROOT,
                                       text=True)

    def run(self, case: Case) -> subprocess.CompletedProcess:
        args = _argv(case.command, self.tmp)
        if args[0] == sys.executable:  # the server is the interpreter; a console script's wrapper runs by path
            args = args[1:]
        streams = self.tmp / "streams" / case.name
        streams.mkdir(parents=True)
        self.server.stdin.write(json.dumps({"argv": args, "cwd": case.cwd.replace("{tmp}", str(self.tmp)),
                                            "stdout": str(streams / "out"), "stderr": str(streams / "err"),
                                            "timeout": TIMEOUT_S}) + "\n")
        self.server.stdin.flush()
        ended = json.loads(self.server.stdout.readline())
        if ended["timed_out"]:
            return subprocess.CompletedProcess(args, -1, "", f"timed out after {TIMEOUT_S} s")
        return subprocess.CompletedProcess(args, ended["returncode"], (streams / "out").read_text(),
                                           (streams / "err").read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


def _modules_of(cases: list[Case]) -> list[str]:
    """What the cases import first: their ``-m`` modules and their console scripts' modules."""
    scripts = {ep.name: ep.module for ep in importlib.metadata.entry_points(group="console_scripts")}
    named = [c.command[1] if c.command[0] == "-m" else scripts.get(c.command[0]) for c in cases]
    return ["torch", *dict.fromkeys(name for name in named if name)]


@pytest.fixture(scope="module")
def bad_input_runs(request, tmp_path_factory):
    """Every selected case, run two at a time: name -> (finished process, fixture folder). A case
    with an environment of its own runs in a fresh interpreter, the others as forks of a server."""
    tmp = tmp_path_factory.mktemp("bad-input")
    _inputs(tmp)
    selected = {item.callspec.params["case"].name for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    cases = [c for c in CASES if c.name in selected]
    servers = queue.Queue()
    for _ in range(2):
        servers.put(ForkedCommands(tmp, _modules_of([c for c in cases if not c.env])))

    def run(case: Case) -> subprocess.CompletedProcess:
        if case.env:
            return _run(case, tmp)
        server = servers.get()
        try:
            return server.run(case)
        finally:
            servers.put(server)

    try:
        with ThreadPoolExecutor(2) as pool:
            done = dict(zip((c.name for c in cases), pool.map(run, cases)))
    finally:
        while not servers.empty():
            servers.get().close()
    return done, tmp


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, bad_input_runs):
    runs, tmp = bad_input_runs
    proc = runs[case.name]
    shown = f"exit {proc.returncode}\nstderr (end):\n{proc.stderr[-2500:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr, shown
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"{case.prog}: "), shown
    for name in case.names:
        assert name in last, (name, last)
    for name in case.also:
        assert name in proc.stderr, (name, shown)


@pytest.mark.parametrize("recipe", ["dyt_llama", "dyt_wav2vec2", "dyt_dna"])
def test_compare_mains_called_from_python_give_one_line(recipe, tmp_path, capsys):
    """``scripts/demo.py`` calls each recipe's compare ``main`` directly, not its console script:
    bad input there is one line and exit status 2 as well."""
    import importlib

    main = importlib.import_module(recipe).SPEC.compare_main()
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "cmp"), "--set", "train.eval_every=0"])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"dyt-{recipe.removeprefix('dyt_').replace('_', '-')}-compare: ") and "train.eval_every=0" in last


def test_every_command_has_cases():
    progs = {c.prog for c in CASES}
    assert {"dyt_llama.train", "dyt_dna.train", "dyt_wav2vec2.train", "dyt_wav2vec2.manifest", "dyt_dna.eval",
            "dyt_wav2vec2.eval", "dyt-llama-compare", "dyt-dna-compare", "dyt-wav2vec2-compare", "dyt-bench",
            "dyt-llama-prepare", "dyt-llama-bench",
            "dyt_llama.corpus"} <= progs
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.slow
def test_what_the_failed_cases_left_behind(bad_input_runs):
    """The malformed DeepSpeed JSON stopped the run before any data was prepared; the manifest tool
    wrote the good files only."""
    runs, tmp = bad_input_runs
    if not {"llama-deepspeed-json-malformed", "manifest-truncated-wav"} <= runs.keys():
        pytest.skip("needs the cases llama-deepspeed-json-malformed and manifest-truncated-wav in the same run")
    assert not (tmp / "cache" / "json-case").exists()
    rows = (tmp / "out-truncated.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[0] for r in rows) == ["good0.wav", "sub/good1.wav"]
    assert all(r.endswith("\t16000") for r in rows)


@pytest.mark.slow
def test_a_refused_fresh_deleted_nothing(bad_input_runs):
    runs, tmp = bad_input_runs
    if not {"dna-compare-fresh-deletes-cwd", "llama-compare-fresh-foreign-folder"} <= runs.keys():
        pytest.skip("needs the cases dna-compare-fresh-deletes-cwd and llama-compare-fresh-foreign-folder in the same run")
    assert (tmp / "cmp-fresh" / "inner" / "keep.txt").read_text() == "not to be deleted\n"
    assert (tmp / "foreign" / "keep.txt").read_text() == "not to be deleted\n"


# ---------------------------------------------------------------- DYT_DEBUG, ranks, a full disk

def test_dyt_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, str(ROOT / "tests/toy_recipe.py"), "--set", "train.steps=-5"]
    quiet = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S)
    loud = subprocess.run(cmd, env={**_env(tmp_path), DEBUG_ENV: "1"}, capture_output=True, text=True, timeout=TIMEOUT_S)
    line = "toy_recipe.py: config error: train.steps: -5 is out of range: it must be at least 1"
    assert quiet.returncode == loud.returncode == 2
    assert quiet.stderr.strip().splitlines()[-1] == line and "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and loud.stderr.strip().endswith(line)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_error_every_rank_hits_is_printed_once(tmp_path):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "tests/toy_recipe.py",
           "--set", "train.steps=-5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("train.steps: -5 is out of range") == 1, out[-3000:]
    assert "Traceback" not in out


def _extensions_built(tmp: Path) -> None:
    """DeepSpeed's CPU communication op and DyT's cpu kernels, built (once per machine) before a run
    under a file-size limit loads them: a compiler started by that run inherits the limit and dies on
    its first object file."""
    code = ("from dyt.train.distributed import load_cpu_communication_op; load_cpu_communication_op()\n"
            "from dyt.kernels import cpu_fused; cpu_fused.load()")
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_too_little_room_for_the_next_checkpoint_stops_before_saving(tmp_path, monkeypatch, capsys):
    """After the first save, one that would not fit beside the newest complete checkpoint (rank 0
    measures; every rank stops on it together) stops the run before DeepSpeed writes anything, with
    one line naming the free space, the checkpoint's size and the step --resume continues from."""
    import collections

    from dyt.train import run_recipe

    sys.path.insert(0, str(ROOT / "tests"))
    from toy_recipe import ToyConfig, ToyTask

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("dyt.train.trainer.shutil.disk_usage", lambda path: usage(2**30, 2**30 - 2**10, 2**10))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        run_recipe(ToyConfig, ToyTask, ["--set", f"train.out_dir={out}", "--set", "train.steps=4", "--set",
                                        "train.save_every=2", "--set", "train.eval_every=0", "--set",
                                        "train.progress=false", "--set", "train.tensorboard=false"], prog="toy")
    assert stopped.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"toy: checkpoint error: no room to save the checkpoint of step 4 in {out / 'checkpoints'}: "
                           "0.0 MiB free, the last checkpoint took "), last
    assert "--resume continues from step 2" in last and "step_00000002" in last, last
    assert (out / "checkpoints/step_00000002/COMPLETE").is_file() and not (out / "checkpoints/step_00000004").exists()


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_resume_continues(tmp_path):
    """A file-size limit (as a full disk) makes the step-4 checkpoint fail: the run stops with exit
    status 2 naming step 4 and the step-2 checkpoint a resume takes; --resume then finishes."""
    out = tmp_path / "run"

    def train(steps: int, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "tests/toy_recipe.py"), "--set", f"train.out_dir={out}",
               "--set", f"train.steps={steps}", "--set", "train.save_every=2", "--set", "train.eval_every=0",
               "--set", "train.tensorboard=false", "--set", "train.progress=false", "--set", "model.width=64", *extra]
        return subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=TIMEOUT_S,
                              preexec_fn=_file_size_limit(limit) if limit else None)

    first = train(2)
    assert first.returncode == 0, first.stderr[-3000:]
    _extensions_built(tmp_path)
    model_file = out / "checkpoints/step_00000002/mp_rank_00_model_states.pt"
    limit = model_file.stat().st_size // 2  # metrics.jsonl and config.yaml stay far below it
    full = train(4, "--resume", limit=limit)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("toy_recipe.py: checkpoint error: could not save the checkpoint of step 4"), last
    assert "--resume continues from step 2" in last and "step_00000002" in last, last
    assert not (out / "checkpoints/step_00000004/COMPLETE").exists()
    assert (out / "checkpoints/step_00000002/COMPLETE").is_file()

    resumed = train(4, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 2, data epoch 0 example 16)" in resumed.stdout  # 2 steps x 8
    assert (out / "checkpoints/step_00000004/COMPLETE").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _two_ranks_by_hand(tmp_path: Path, out: Path, *extra: str, limit: int | None = None,
                       limited_rank: int = 1) -> list[tuple[int, str, str]]:
    """A 2-rank toy run at ZeRO-3 with its ranks started by hand, as on two nodes, with no launcher to
    stop the others once one exits: each rank's exit status, stdout and stderr. ``limit``: the file-size
    limit (a full disk) of ``limited_rank``."""
    env = {**_env(tmp_path), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, str(ROOT / "tests/toy_recipe.py"), "--set", f"train.out_dir={out}", "--set",
           "train.steps=4", "--set", "train.save_every=2", "--set", "train.eval_every=0", "--set",
           "train.tensorboard=false", "--set", "train.progress=false", "--set", "model.width=64", "--set",
           "train.zero_stage=3", *extra]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=_file_size_limit(limit) if limit and rank == limited_rank else None)
             for rank in (0, 1)]  # pipes, drained side by side: a file the rank writes would be under its limit
    try:
        with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
            outputs = list(pool.map(lambda proc: proc.communicate(timeout=TIMEOUT_S), procs))
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, stdout, stderr) for proc, (stdout, stderr) in zip(procs, outputs)]


@pytest.mark.distributed
def test_a_save_failing_on_one_rank_stops_every_rank_together(tmp_path):
    """Rank 1's checkpoint write failing (its own full disk) inside DeepSpeed's save raised on rank 1
    alone: the others waited in the save's next collective, on another node until the process group's
    timeout (10 min); here gloo saw the peer go and rank 0 reported "Connection closed by peer" as its
    own save failure. The two ranks are started by hand, as on two nodes, with no launcher to stop
    the others. At ZeRO-3, whose save also gathers parameters after the writes, both now stop at
    once, rank 0 naming rank 1 and its error in one line, and a --resume trains through."""
    out = tmp_path / "run"
    _extensions_built(tmp_path)
    ranks = _two_ranks_by_hand(tmp_path, out, limit=3000)  # above the start-up files rank 1 writes, below its ZeRO-3 shards
    assert [code for code, _, _ in ranks] == [2, 2], [err[-3000:] for _, _, err in ranks]
    last = ranks[0][2].strip().splitlines()[-1]
    assert last.startswith(f"toy_recipe.py: checkpoint error: could not save the checkpoint of step 2 in "
                           f"{out / 'checkpoints'} (rank 1: RuntimeError: "), last
    assert "file write failed" in last and "there is no complete checkpoint yet: --resume starts from step 0" in last
    assert "checkpoint error" not in ranks[1][2] and not any("Traceback" in err for _, _, err in ranks)
    assert not (out / "checkpoints/step_00000002/COMPLETE").exists()
    ranks = _two_ranks_by_hand(tmp_path, out, "--resume")
    assert [code for code, _, _ in ranks] == [0, 0], [err[-3000:] for _, _, err in ranks]
    assert (out / "checkpoints/step_00000004/COMPLETE").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # started anew: there was no complete checkpoint to resume from


@pytest.mark.distributed
@pytest.mark.parametrize("write", ["records", "metrics", "damaged metrics"])
def test_rank_0_failing_to_write_the_run_folder_stops_every_rank_together(tmp_path, write):
    """Rank 0 alone writes the run's records (config.yaml, launches.jsonl, ...) at the start and a
    metrics row each logged step. When one failed (a full disk) it stopped alone with a traceback, and
    the other ranks went on into the next collective (on another node until the process group's
    timeout; here gloo saw rank 0 go). Now every rank stops at that write together, rank 0 saying why
    in one line. The records fail on a folder in config.yaml's place, the metrics on a file-size limit
    of rank 0 (above the start-up files, below metrics.jsonl at its 24th row); a metrics.jsonl damaged
    by hand, read by rank 0 alone on --resume, stops every rank too, rank 0 naming its line."""
    out = tmp_path / "run"
    _extensions_built(tmp_path)
    if write == "records":
        (out / "config.yaml").mkdir(parents=True)
    if write == "damaged metrics":  # --resume with no checkpoint yet starts from step 0, reading the file
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\nnot a row\n{"step": 2}\n')
        ranks = _two_ranks_by_hand(tmp_path, out, "--resume")
        assert [code for code, _, _ in ranks] == [2, 2], [err[-3000:] for _, _, err in ranks]
        last = ranks[0][2].strip().splitlines()[-1]
        assert last == (f"toy_recipe.py: error: {out / 'metrics.jsonl'}:2: not a metrics row (damaged by hand?); "
                        "delete the line or the rows from it on, then run again"), last
        assert "toy_recipe.py:" not in ranks[1][2] and not any("Traceback" in err for _, _, err in ranks)
        return
    ranks = _two_ranks_by_hand(tmp_path, out, "--set", "train.steps=24", "--set", "train.save_every=0",
                               limit=4000 if write == "metrics" else None, limited_rank=0)
    assert [code for code, _, _ in ranks] == [2, 2], [err[-3000:] for _, _, err in ranks]
    last = ranks[0][2].strip().splitlines()[-1]
    said = {"records": f"the run's records in {out} (IsADirectoryError: ", "metrics": "the metrics of step "}[write]
    assert last.startswith("toy_recipe.py: write error: could not write " + said), last
    assert "there is no complete checkpoint yet: --resume starts from step 0" in last, last
    if write == "metrics":
        assert f"to {out / 'metrics.jsonl'} (OSError: [Errno 27] File too large" in last, last
    assert "write error" not in ranks[1][2] and not any("Traceback" in err for _, _, err in ranks)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.distributed
@pytest.mark.parametrize("split, failing", [("train", 1), ("validation", 0)])
def test_a_batch_one_rank_cannot_read_stops_every_rank_together(tmp_path, split, failing):
    """A file damaged or gone mid-run, met by one rank reading its batch, stopped that rank alone,
    and the other ranks waited in the step's next collective (on another node until the process
    group's timeout; here gloo saw the peer go, and rank 0 crashed with a traceback of its own). Now
    the ranks agree after each batch read, for training and validation alike: both stop together,
    rank 0 naming the rank that failed and its error in one line, and what --resume takes.
    Rank 1 fails in step 3's training batch (its reads 9 to 12 at micro-batch 4), rank 0 in its first
    validation batch at step 2, before step 2's checkpoint."""
    out = tmp_path / "run"
    _extensions_built(tmp_path)
    ranks = _two_ranks_by_hand(tmp_path, out, "--set", "train.micro_batch_size=4", "--set", "train.eval_every=2",
                               "--set", "train.eval_batches=2", "--set", "data.unreadable_from_read="
                               + ("10" if split == "train" else "1"), "--set", f"data.unreadable_split={split}",
                               "--set", f"data.fault_rank={failing}")
    assert [code for code, _, _ in ranks] == [2, 2], [err[-3000:] for _, _, err in ranks]
    last = ranks[0][2].strip().splitlines()[-1]
    what = ("the training batch of step 3" if split == "train"
            else "a validation batch (turn 1 of 1 on each rank)")
    assert last.startswith(f"toy_recipe.py: read error: could not read {what} (rank {failing}: _ToyDataError: "
                           "example "), last
    assert last.endswith("of the toy data is unreadable (data.unreadable_from_read)); " + (
        f"--resume continues from step 2 ({out / 'checkpoints/step_00000002'})" if split == "train"
        else "there is no complete checkpoint yet: --resume starts from step 0")
        + ". Mend what the error names and run again with --resume"), last
    assert "toy_recipe.py:" not in ranks[1][2] and not any("Traceback" in err for _, _, err in ranks)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["training", "validation"])
def test_a_forward_failing_on_one_rank_stops_every_rank_together_below_zero3(tmp_path, stage):
    """A forward that raised on one rank alone (a GPU out of memory on a longer batch, a bug met by
    one rank's data) left the other ranks in the step's loss check, on other nodes until the process
    group's timeout. At ZeRO-0/1/2 the forward is not collective: in training the loss check
    all-reduces a failure flag with the loss's finiteness (no collective more); in validation the
    failing rank reads on with the others (each read is agreed on) and all agree after the last
    batch. Every rank stops there, rank 0 naming rank 1 and its error in one line, rank 1 printing
    its own traceback and exiting 1. (Under ZeRO-3 the forward gathers the parameters: a rank that
    left it cannot agree, and is raised as before.) Validation: 4 batches, 2 a rank, at step 2."""
    out = tmp_path / "run"
    _extensions_built(tmp_path)
    fault = ["--set", "data.forward_fails_at_step=3"] if stage == "training" else [
        "--set", "data.validation_forward_fails=true", "--set", "train.eval_every=2", "--set", "train.eval_batches=4"]
    ranks = _two_ranks_by_hand(tmp_path, out, "--set", "train.zero_stage=2", *fault)
    assert [code for code, _, _ in ranks] == [2, 1], [err[-3000:] for _, _, err in ranks]
    last = ranks[0][2].strip().splitlines()[-1]
    if stage == "training":
        said, resume = ("the training batch of step 3 failed (rank 1: RuntimeError: an injected failure of the forward "
                        "of step 3 (data.forward_fails_at_step)", f"--resume continues from step 2 ({out / 'checkpoints/step_00000002'})")
    else:  # at step 2, before step 2's checkpoint
        said, resume = ("a validation batch failed (rank 1: RuntimeError: an injected failure of a validation forward "
                        "(data.validation_forward_fails)", "there is no complete checkpoint yet: --resume starts from step 0")
    assert last == (f"toy_recipe.py: error: the forward of {said} (not a data error: that rank prints its traceback)); "
                    f"{resume}. Mend what the error names and run again with --resume"), last
    assert "Traceback" not in ranks[0][2] and "RuntimeError: an injected failure" in ranks[1][2].strip().splitlines()[-1]


@pytest.mark.distributed
def test_a_resume_one_rank_cannot_make_stops_every_rank_together_rank_0_saying_why(tmp_path):
    """Before a resume loads, every rank checks its data's identity against the run's record and its
    share of the checkpoint's files, and all stop if any rank found a problem, rank 0 naming it.
    - Data made otherwise on rank 1 alone: rank 1 raised a config error every rank meets alike, so it
      stayed quiet, and rank 0 said only "another rank's data is not what the run trained on (that
      rank says what differs)", which no rank said. Rank 0 now names the rank and what differs.
    - Rank 1's own ZeRO-3 shard cut short (a copy that stopped): DeepSpeed's load is collective, so
      rank 1 stopped alone and rank 0, in the load's next collective, reported gloo's lost peer as its
      own load failure (over several nodes it would wait until the timeout). A missing file is found
      by rank 0 (tests/test_harness.py), and every resume of the suite passes the check on a sound
      checkpoint: the 2-rank ZeRO-3 resumes of tests/test_scale.py among them."""
    out = tmp_path / "run"
    _extensions_built(tmp_path)
    ranks = _two_ranks_by_hand(tmp_path, out)
    assert [code for code, _, _ in ranks] == [0, 0], [err[-3000:] for _, _, err in ranks]

    def resumed(*extra: str) -> str:
        ranks = _two_ranks_by_hand(tmp_path, out, "--resume", "--set", "train.steps=6", *extra)
        assert [code for code, _, _ in ranks] == [2, 2], [err[-3000:] for _, _, err in ranks]
        assert "toy_recipe.py:" not in ranks[1][2] and not any("Traceback" in err for _, _, err in ranks)
        return ranks[0][2].strip().splitlines()[-1]

    last = resumed("--set", "data.data_made_otherwise=true")
    assert last.startswith(f"toy_recipe.py: config error: rank 1: --resume: the data is not what {out} trained on "
                           "(toy data as always -> made otherwise; recorded in "), last
    newest, name = out / "checkpoints/step_00000004", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sound = (newest / name).read_bytes()
    (newest / name).write_bytes(sound[: len(sound) // 2])
    assert resumed() == (f"toy_recipe.py: checkpoint error: {newest} is marked complete but a file in it is damaged "
                         f"or missing ({name}: File is not a zip file): delete that folder to resume from the one before")
