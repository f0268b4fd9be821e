"""Choose the fused Triton kernels' tiles on a GPU: sweep, select on some shapes, confirm on others.

For each candidate tile (elements per program, warps) of the forward and of the backward (with the
backward's programs per multiprocessor, whether it prefetches the next row block and whether a
program's rows are one range or interleaved with the other programs), every candidate is first checked against the float64
reference (output and all four gradients, within dyt.selfcheck.TOL), then timed with
``triton.testing.do_bench`` (median) on the SELECTION shapes. The fastest by geometric mean over
those shapes is chosen, and only then timed on the CONFIRMATION shapes beside the shipped constants
(``dyt.kernels.fused.FORWARD_TILE`` etc.), copy, ``F.layer_norm`` and ``F.rms_norm``, so the
figures that justify a choice are not the ones it was chosen on. ``--old FILE`` adds a module with
the same ``fused_forward`` / ``fused_backward`` (an earlier kernel) to the confirmation table.

    python scripts/tune_fused_tiles.py [--dtype bf16] [--json OUT.json] [--old OLD_FUSED.py]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math

import torch
import torch.nn.functional as F

FORWARD_TILES = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]
BACKWARD_TILES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8)]
PROGRAMS_PER_SM = [2, 4, 8]
PREFETCH = [False, True]
INTERLEAVE = [False, True]
CHECK_SHAPE = (257, 4096)  # odd rows, a full LLaMA width: every candidate is checked here first
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def _inputs(shape, dtype, seed=0):
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
    except AssertionError as error:
        print(f"FAIL at {shape}: {str(error).splitlines()[0]}", flush=True)
        return False
    return True


def _assert_close_to_reference(fwd, bwd, shape, dtype) -> None:
    from dyt.selfcheck import TOL, assert_grad_close, reference

    x, dy, alpha, weight, bias = _inputs(shape, dtype, seed=1)
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

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _time_forward(fwd, shape, dtype) -> float:
    x, _, alpha, weight, bias = _inputs(shape, dtype)
    return _time(lambda: fwd(x, alpha, weight, bias))


def _time_backward(bwd, shape, dtype) -> float:
    x, dy, alpha, weight, _ = _inputs(shape, dtype)
    return _time(lambda: bwd(dy, x, alpha, weight, True))


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _op_times(op, params, shape, dtype) -> dict[str, float]:
    """Forward under no_grad, and forward + backward through autograd (the gradients of the input
    and of every parameter, as dyt-bench takes them), for ``op(x)``."""
    x, dy, *_ = _inputs(shape, dtype)
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        fwd = _time(lambda: op(x))
    return {"fwd": fwd, "f+b": _time(lambda: torch.autograd.grad(op(xg), [xg, *params], dy))}


def _baselines(shape, dtype) -> dict[str, dict[str, float]]:
    x, _, _, weight, bias = _inputs(shape, dtype)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    return {"copy": {"fwd": _time(lambda: x.clone()), "f+b": float("nan")},
            "F.layer_norm": _op_times(lambda t: F.layer_norm(t, t.shape[-1:], w, b), [w, b], shape, dtype),
            "F.rms_norm": _op_times(lambda t: F.rms_norm(t, t.shape[-1:], w), [w], shape, dtype)}


def _dyt_times(fwd, bwd, shape, dtype) -> dict[str, float]:
    from dyt.kernels import autograd_functions

    function, _ = autograd_functions(fwd, bwd)
    _, _, alpha, weight, bias = _inputs(shape, dtype)
    params = [t.clone().requires_grad_() for t in (alpha, weight, bias)]
    return _op_times(lambda t: function.apply(t, *params), params, shape, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--select", type=_shape, nargs="+", default=[(4096, 4096), (16384, 4096), (4096, 5120)],
                        help="shapes the tiles are chosen on (default: LLaMA-7B's, and 13B's width)")
    parser.add_argument("--confirm", type=_shape, nargs="+", default=[(32768, 4096), (8192, 8192), (8192, 5120)],
                        help="shapes the choice is then reported on")
    parser.add_argument("--old", help="a module file with an earlier fused_forward / fused_backward")
    parser.add_argument("--json", help="write every timing here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_fused_tiles.py needs a CUDA device (the kernels' tiles matter only there)")
    from dyt.kernels import fused

    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}; "
          f"select on {args.select}, confirm on {args.confirm}")
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "select": {}, "confirm": {}}

    # 1. every candidate checked against float64, then timed on the selection shapes
    fwd_score, bwd_score = {}, {}
    for tile in FORWARD_TILES:
        fwd = lambda x, a, w, b, tile=tile: fused.fused_forward(x, a, w, b, tile=tile)  # noqa: E731
        if not _check(fwd, fused.fused_backward, CHECK_SHAPE, dtype):
            continue
        ms = [_time_forward(fwd, s, dtype) for s in args.select]
        fwd_score[tile] = ms
        record["select"][f"forward {tile}"] = ms
        print(f"forward tile {tile}: " + "  ".join(f"{m:.4f} ms" for m in ms), flush=True)
    candidates = itertools.product(BACKWARD_TILES, PROGRAMS_PER_SM, PREFETCH, INTERLEAVE)
    for tile, per_sm, prefetch, interleave in candidates:
        bwd = functools.partial(fused.fused_backward, tile=tile, programs_per_sm=per_sm, prefetch=prefetch,
                                interleave=interleave)
        if not _check(fused.fused_forward, bwd, CHECK_SHAPE, dtype):
            continue
        ms = [_time_backward(bwd, s, dtype) for s in args.select]
        bwd_score[(tile, per_sm, prefetch, interleave)] = ms
        record["select"][f"backward {tile} x{per_sm}/SM prefetch {prefetch} interleave {interleave}"] = ms
        print(f"backward tile {tile}, {per_sm} programs/SM, prefetch {prefetch}, interleave {interleave}: "
              + "  ".join(f"{m:.4f} ms" for m in ms), flush=True)
    best_fwd = min(fwd_score, key=lambda k: _geomean(fwd_score[k]))
    best_bwd, best_per_sm, best_prefetch, best_interleave = min(bwd_score, key=lambda k: _geomean(bwd_score[k]))
    record["chosen"] = {"forward": best_fwd, "backward": best_bwd, "programs_per_sm": best_per_sm,
                        "prefetch": best_prefetch, "interleave": best_interleave}
    shipped = (fused.FORWARD_TILE, fused.BACKWARD_TILE, fused.BACKWARD_PROGRAMS_PER_SM, fused.BACKWARD_PREFETCH,
               fused.BACKWARD_INTERLEAVE)
    record["shipped"] = shipped
    print(f"chosen on {args.select}: forward {best_fwd}, backward {best_bwd} with {best_per_sm} programs/SM, "
          f"prefetch {best_prefetch}, interleave {best_interleave}; shipped: forward {shipped[0]}, backward "
          f"{shipped[1]} with {shipped[2]}, prefetch {shipped[3]}, interleave {shipped[4]}")

    # 2. the choice, the shipped constants and the earlier kernel on the confirmation shapes
    variants = {
        "chosen": (lambda x, a, w, b: fused.fused_forward(x, a, w, b, tile=best_fwd),
                   lambda dy, x, a, w, hb: fused.fused_backward(dy, x, a, w, hb, tile=best_bwd,
                                                                programs_per_sm=best_per_sm, prefetch=best_prefetch,
                                                                interleave=best_interleave)),
        "shipped": (fused.fused_forward, fused.fused_backward),
    }
    if args.old:
        spec = importlib.util.spec_from_file_location("old_fused", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        variants["old"] = (old.fused_forward, old.fused_backward)
    print(f"\n{'shape':>11} {'op':<22} {'fwd ms':>8} {'f+b ms':>8} {'fwd/copy':>8} {'f+b/LN':>7} {'f+b/RMS':>7}")
    for s in args.confirm:
        rows = _baselines(s, dtype)
        for name, (fwd, bwd) in variants.items():
            if not _check(fwd, bwd, s, dtype):
                continue
            rows[f"DyT fused ({name})"] = _dyt_times(fwd, bwd, s, dtype)
        copy, ln, rms = rows["copy"]["fwd"], rows["F.layer_norm"]["f+b"], rows["F.rms_norm"]["f+b"]
        record["confirm"][f"{s[0]}x{s[1]}"] = rows
        for name, r in rows.items():
            print(f"{s[0]:>5}x{s[1]:<5} {name:<22} {r['fwd']:8.4f} {r['f+b']:8.4f} {r['fwd'] / copy:8.2f} "
                  f"{r['f+b'] / ln:7.2f} {r['f+b'] / rms:7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
