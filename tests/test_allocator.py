"""glibc's malloc on CPU training ranks (dyt.allocator, train.reuse_freed_memory): a freed block above
32 MiB is kept for the next step instead of being unmapped and faulted in again."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dyt.allocator import chosen_in_environment
from dyt.bench import is_allocator_setting

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Faults of each of three fills of a fresh 64 MiB tensor, the one before freed each time, after SETTLING
# fills that let the heap settle (a small allocation between a free and the next fill can take a bite
# of the freed block, so that the heap grows on some early fills before it holds one whole:
# docs/performance.md; with another process busy on the CPUs, as in the suite, up to the sixth fill
# after keep_freed_blocks still faulted); then whatever keep_freed_blocks says, then the same again. In a fresh interpreter, so this process's malloc is
# left as it was.
PROBE = """
import json, resource, torch
SETTLING = 12
from dyt.allocator import keep_freed_blocks
from dyt.bench import allocator_env

def settled_fill_faults():
    counts = []
    for _ in range(SETTLING + 3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts[SETTLING:]

default = settled_fill_faults()
said = keep_freed_blocks()
print(json.dumps({"default": default, "said": said, "after": settled_fill_faults(), "bench": allocator_env()}))
"""


def _probe(**env_extra):
    env = {k: v for k, v in os.environ.items() if not is_allocator_setting(k)}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra}, capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_freed_large_block_is_reused_without_faulting_its_pages_again(fresh_mapping_faults):
    result = _probe()
    pages = fresh_mapping_faults(64 * 2**20)
    assert min(result["default"]) >= 0.9 * pages, result  # glibc's defaults: a fresh mmap, every page faults
    assert max(result["after"]) < 0.05 * pages, result
    assert "stay in the heap" in result["said"]
    # a benchmark run later in the same process must not say "glibc defaults"
    assert result["bench"] == {"mallopt M_MMAP_THRESHOLD": str(2**31 - 1), "mallopt M_TRIM_THRESHOLD": str(2**31 - 1)}


def test_an_allocator_chosen_in_the_environment_is_left_alone(fresh_mapping_faults):
    result = _probe(MALLOC_TRIM_THRESHOLD_="131072")
    pages = fresh_mapping_faults(64 * 2**20)
    assert result["said"] == "allocator: MALLOC_TRIM_THRESHOLD_ is set in the environment, so malloc is left as it is"
    assert min(result["after"]) >= 0.9 * pages, result
    assert "mallopt M_MMAP_THRESHOLD" not in result["bench"]


@pytest.mark.parametrize("env, chosen", [
    ({}, None),
    ({"MALLOC_MMAP_THRESHOLD_": "1"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TOP_PAD_": "0"}, "MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "GLIBC_TUNABLES"),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, None),  # not malloc's
    ({"LD_PRELOAD": "libjemalloc.so.2"}, None),  # jemalloc ignores glibc's mallopt: nothing to leave
])
def test_which_environment_variables_choose_the_allocator(env, chosen):
    assert chosen_in_environment(env) == chosen


@pytest.mark.parametrize("reuse, already", [(True, False), (True, True), (False, False)])
def test_training_on_cpu_keeps_freed_blocks_unless_turned_off(tmp_path, monkeypatch, capsys, reuse, already):
    import dyt.train.trainer as trainer
    from dyt.train import run_recipe
    from toy_recipe import ToyConfig, ToyTask

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_blocks", lambda: calls.append(1) or "allocator: probe")
    monkeypatch.setattr(trainer, "cannot_keep_freed_blocks", lambda: "this process already keeps freed blocks" if already else None)
    monkeypatch.setattr(trainer, "applied", lambda: {"M_MMAP_THRESHOLD": 2**31 - 1})
    run_recipe(ToyConfig, ToyTask, ["--set", f"train.out_dir={tmp_path}", "--set", "train.steps=1",
                                    "--set", "train.progress=false", "--set", f"train.reuse_freed_memory={reuse}"])
    assert calls == ([1] if reuse else [])
    printed = capsys.readouterr().out
    assert ("allocator: probe" in printed) == reuse
    # the way back is offered only by the fit that set it: a process cannot return to glibc's defaults
    assert ("train.reuse_freed_memory=false keeps glibc's defaults" in printed) == (reuse and not already)


def test_the_allocator_script_times_every_setting(tmp_path):
    """scripts/bench_allocator.py on the toy recipe, one rank, one round: every setting trained and
    compared with glibc's defaults in the same round."""
    script = HERE.parent / "scripts" / "bench_allocator.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "allocator.json"
    done = subprocess.run([sys.executable, str(script), "--module", "toy_recipe", "--ranks", "1", "--rounds", "1",
                           "--steps", "3", "--skip", "1", "--set", "train.tensorboard=false", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sorted(r["setting"] for r in result["runs"]) == ["freed blocks reused", "glibc defaults", "huge pages"]
    assert all(r["step_seconds"] > 0 and r["peak_rss_mb"] > 0 for r in result["runs"])
    assert result["ratios"]["glibc defaults"] == {"step_seconds": 1.0, "peak_rss_mb": 1.0}
    assert result["settings"]["glibc defaults"]["overrides"] == ["train.reuse_freed_memory=false"]
