"""Choose the fused Triton kernels' tiles on a GPU: sweep, select on some shapes, confirm on others.

Candidates: the forward's tile (elements per program, warps); the backward's tile, programs per
multiprocessor, whether it prefetches the next row block and whether a program's rows are one range
or interleaved with the other programs. Every candidate is first checked against the float64
reference (output and all four gradients, within dyt.selfcheck.TOL), then timed with
``triton.testing.do_bench`` on the SELECTION shapes. The fastest by geometric mean over those
shapes is chosen, and only then timed on the CONFIRMATION shapes beside the shipped constants
(``dyt.kernels.fused.FORWARD_TILE`` etc.), copy, ``F.layer_norm`` and ``F.rms_norm``, so the
figures that justify a choice are not the ones it was chosen on. ``--old FILE`` adds a module with
the same ``fused_forward`` / ``fused_backward`` (an earlier kernel) to the confirmation table.

Every candidate of a shape reads the same input tensors, and the candidates are timed in
interleaved rounds (one ``do_bench`` of each per round, median over rounds): the backward's speed
varied by ~25% between runs of the same configuration on an H200, so a drift or a tensor placement
must hit every candidate alike.

    python scripts/tune_fused_tiles.py [--dtype bf16] [--select ROWSxCOLS ...] [--confirm ROWSxCOLS ...]
        [--rounds 3] [--json OUT.json] [--old OLD_FUSED.py]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dyt.bench import DTYPES, count_arg, shape_arg

FORWARD_TILES = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]
BACKWARD_TILES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8)]
PROGRAMS_PER_SM = [2, 4, 8]
PREFETCH = [False, True]
INTERLEAVE = [False, True]
CHECK_SHAPE = (257, 4096)  # odd rows, a full LLaMA width: every candidate is checked here first


@functools.cache
def _inputs(shape, dtype, seed=0):
    """x, dy, alpha, weight, bias for ``shape``: made once, so every candidate reads the same tensors."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    alpha = torch.tensor([0.7], device="cuda")
    weight = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
    bias = torch.randn(shape[1], generator=g, device="cuda").to(dtype)
    return x, dy, alpha, weight, bias


def _check(fwd, bwd, shape, dtype) -> bool:
    """Output and gradients of one (forward, backward) pair against float64, within TOL[dtype];
    a failure is printed and the candidate dropped."""
    try:
        _assert_close_to_reference(fwd, bwd, shape, dtype)
    except Exception as error:  # noqa: BLE001 - a wrong result, or a candidate Triton cannot compile (resources)
        print(f"FAIL at {shape}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}", flush=True)
        return False
    return True


def _assert_close_to_reference(fwd, bwd, shape, dtype) -> None:
    from dyt.selfcheck import TOL, assert_grad_close, reference

    x, dy, alpha, weight, bias = _inputs(shape, dtype, seed=1)
    x = (x.float() * 3).to(dtype)  # as dyt.selfcheck: alpha * x reaches tanh's tails
    y, _ = fwd(x, alpha, weight, bias)
    dx, dalpha, dweight, dbias = bwd(dy, x, alpha, weight, True)
    leaves = [t.detach().double().requires_grad_() for t in (x, alpha, weight, bias)]
    y_ref = reference(*leaves)
    y_ref.backward(dy.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_ref.detach(), atol=tol["atol"], rtol=tol["rtol"])
    for name, got, want in zip(["x", "alpha", "weight", "bias"], [dx, dalpha, dweight, dbias], leaves):
        assert_grad_close(got, want.grad, tol["grad"], f"grad {name}")


def _time(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _time_rounds(fns: dict[object, Callable[[], object]], rounds: int) -> dict[object, float]:
    """Median over ``rounds`` of each callable's ``do_bench`` median, one of each per round."""
    samples: dict[object, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_time(fn))
    return {name: statistics.median(times) for name, times in samples.items()}


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _forward_call(fwd, shape, dtype):
    x, _, alpha, weight, bias = _inputs(shape, dtype)
    return lambda: fwd(x, alpha, weight, bias)


def _backward_call(bwd, shape, dtype):
    x, dy, alpha, weight, _ = _inputs(shape, dtype)
    return lambda: bwd(dy, x, alpha, weight, True)


def _op_calls(op, params, shape, dtype) -> tuple[Callable, Callable]:
    """(forward under no_grad, forward + backward through autograd) for ``op(x)``: the gradients of
    the input and of every parameter, as dyt-bench takes them."""
    x, dy, *_ = _inputs(shape, dtype)
    xg = x.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            return op(x)

    return forward, lambda: torch.autograd.grad(op(xg), [xg, *params], dy)


def _norm_calls(shape, dtype) -> dict[str, tuple[Callable, Callable]]:
    _, _, _, weight, bias = _inputs(shape, dtype)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    return {"F.layer_norm": _op_calls(lambda t: F.layer_norm(t, t.shape[-1:], w, b), [w, b], shape, dtype),
            "F.rms_norm": _op_calls(lambda t: F.rms_norm(t, t.shape[-1:], w), [w], shape, dtype)}


def _dyt_calls(fwd, bwd, shape, dtype) -> tuple[Callable, Callable]:
    from dyt.kernels import autograd_functions

    function, _ = autograd_functions(fwd, bwd)
    _, _, alpha, weight, bias = _inputs(shape, dtype)
    params = [t.clone().requires_grad_() for t in (alpha, weight, bias)]
    return _op_calls(lambda t: function.apply(t, *params), params, shape, dtype)


def _select(candidates: dict, call, shapes, dtype, rounds: int) -> dict[object, list[float]]:
    """Each candidate's time per selection shape (candidates interleaved within each shape)."""
    per_shape = [_time_rounds({name: call(fn, s, dtype) for name, fn in candidates.items()}, rounds) for s in shapes]
    return {name: [times[name] for times in per_shape] for name in candidates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--select", type=shape_arg, nargs="+", default=[(4096, 4096), (16384, 4096), (4096, 5120)],
                        help="shapes the tiles are chosen on (default: LLaMA-7B's, and 13B's width)")
    parser.add_argument("--confirm", type=shape_arg, nargs="+", default=[(32768, 4096), (8192, 8192), (8192, 5120)],
                        help="shapes the choice is then reported on")
    parser.add_argument("--rounds", type=count_arg(1), default=3, help="interleaved timing rounds (median over them)")
    parser.add_argument("--old", help="a module file with an earlier fused_forward / fused_backward")
    parser.add_argument("--json", help="write every timing here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "tune_fused_tiles.py: needs a CUDA device (the kernels' tiles matter only there)\n")
    from dyt.kernels import fused

    old = _load_old(args.old) if args.old else None  # before the sweep: a bad file fails in seconds, not after it
    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}; "
          f"select on {args.select}, confirm on {args.confirm}; median of {args.rounds} interleaved rounds")
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "rounds": args.rounds, "select": {}, "confirm": {}}

    # 1. every candidate checked against float64, then timed on the selection shapes
    forwards = {tile: functools.partial(fused.fused_forward, tile=tile) for tile in FORWARD_TILES}
    forwards = {k: f for k, f in forwards.items() if _check(f, fused.fused_backward, CHECK_SHAPE, dtype)}
    backwards = {
        (tile, per_sm, prefetch, interleave): functools.partial(
            fused.fused_backward, tile=tile, programs_per_sm=per_sm, prefetch=prefetch, interleave=interleave)
        for tile, per_sm, prefetch, interleave in itertools.product(BACKWARD_TILES, PROGRAMS_PER_SM, PREFETCH,
                                                                    INTERLEAVE)}
    backwards = {k: b for k, b in backwards.items() if _check(fused.fused_forward, b, CHECK_SHAPE, dtype)}
    if not forwards or not backwards:
        parser.exit(1, "tune_fused_tiles.py: no forward or no backward candidate passed the float64 check (above)\n")
    fwd_score = _select(forwards, _forward_call, args.select, dtype, args.rounds)
    bwd_score = _select(backwards, _backward_call, args.select, dtype, args.rounds)
    for tile, ms in fwd_score.items():
        record["select"][f"forward {tile}"] = ms
        print(f"forward tile {tile}: " + "  ".join(f"{m:.4f} ms" for m in ms))
    for (tile, per_sm, prefetch, interleave), ms in bwd_score.items():
        record["select"][f"backward {tile} x{per_sm}/SM prefetch {prefetch} interleave {interleave}"] = ms
        print(f"backward tile {tile}, {per_sm} programs/SM, prefetch {prefetch}, interleave {interleave}: "
              + "  ".join(f"{m:.4f} ms" for m in ms))
    best_fwd = min(fwd_score, key=lambda k: _geomean(fwd_score[k]))
    best_bwd = min(bwd_score, key=lambda k: _geomean(bwd_score[k]))
    keys = ("backward", "programs_per_sm", "prefetch", "interleave")
    record["chosen"] = {"forward": best_fwd, **dict(zip(keys, best_bwd))}
    shipped = (fused.BACKWARD_TILE, fused.BACKWARD_PROGRAMS_PER_SM, fused.BACKWARD_PREFETCH,
               fused.BACKWARD_INTERLEAVE)
    record["shipped"] = {"forward": fused.FORWARD_TILE, **dict(zip(keys, shipped))}
    print(f"chosen on {args.select}: {record['chosen']}\nshipped: {record['shipped']}", flush=True)
    _write(args.json, record)  # the sweep's timings kept if the confirmation stage fails

    # 2. the choice, the shipped constants and the earlier kernel on the confirmation shapes
    variants = {"chosen": (forwards[best_fwd], backwards[best_bwd]),
                "shipped": (fused.fused_forward, fused.fused_backward)}
    if old is not None:
        variants["old"] = (old.fused_forward, old.fused_backward)
    print(f"\n{'shape':>11} {'op':<22} {'fwd ms':>8} {'f+b ms':>8} {'fwd/copy':>8} {'f+b/LN':>7} {'f+b/RMS':>7}")
    for s in args.confirm:
        calls = _norm_calls(s, dtype)
        for name, (fwd, bwd) in variants.items():
            if _check(fwd, bwd, s, dtype):
                calls[f"DyT fused ({name})"] = _dyt_calls(fwd, bwd, s, dtype)
        x = _inputs(s, dtype)[0]
        forward_ms = _time_rounds({"copy": x.clone, **{k: f for k, (f, _) in calls.items()}}, args.rounds)
        both_ms = _time_rounds({k: b for k, (_, b) in calls.items()}, args.rounds)
        rows = {name: {"fwd": forward_ms[name], "f+b": both_ms.get(name, float("nan"))} for name in forward_ms}
        copy, ln, rms = rows["copy"]["fwd"], rows["F.layer_norm"]["f+b"], rows["F.rms_norm"]["f+b"]
        record["confirm"][f"{s[0]}x{s[1]}"] = rows
        for name, r in rows.items():
            print(f"{s[0]:>5}x{s[1]:<5} {name:<22} {r['fwd']:8.4f} {r['f+b']:8.4f} {r['fwd'] / copy:8.2f} "
                  f"{r['f+b'] / ln:7.2f} {r['f+b'] / rms:7.2f}", flush=True)
    _write(args.json, record)


def _load_old(path: str):
    """An earlier fused.py as a module of dyt.kernels, so its relative imports resolve."""
    spec = importlib.util.spec_from_file_location("dyt.kernels._old_fused", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: str | None, record: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
