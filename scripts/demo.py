"""The README's main job: a small LN-vs-DyT comparison on real data, ending in one report.

1. LLaMA (tiny config) pretrained on Shakespeare + Austen with RMSNorm and with DyT, 2 ranks under
   the deepspeed launcher (``dyt-llama-compare``): table, loss curves, alpha, S-curves.
2. ``dyt-bench``: DyT's backends against LayerNorm / RMSNorm on this machine.
3. ``convert_norms`` on real architectures (torchaudio's wav2vec 2.0 Base, fairseq2's LLaMA).

Writes ``<out>/report.md``. Re-running resumes or reuses finished training runs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dyt import NormConfig, convert_norms
from dyt.bench import format_kernels
from dyt.bench import main as bench_main
from dyt_llama.compare import main as compare_main


def wav2vec2_base():
    import torchaudio

    return "torchaudio wav2vec2_base", torchaudio.models.wav2vec2_base(), NormConfig(kind="dyt"), None


def llama_125m():
    from fairseq2.models.llama import LLaMAConfig, create_llama_model

    config = LLaMAConfig(
        model_dim=768, max_seq_len=2048, vocab_size=32000, num_layers=12,
        num_attn_heads=12, num_key_value_heads=12, ffn_inner_dim=2048,
    )
    policy = NormConfig(kind="dyt", bias=False, alpha_policy="llm")

    def role(path: str) -> str:
        return "attention" if "self_attn" in path else "ffn" if "ffn" in path else "final"

    return "fairseq2 LLaMA (125M-size config)", create_llama_model(config), policy, role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--llama-config", type=Path, default=Path("recipes/llama/tiny.yaml"))
    parser.add_argument("--nproc", type=int, default=2, help="ranks for the training runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("== 1/3 LLaMA pretraining, RMSNorm vs DyT (tiny config, 2 ranks, deepspeed launcher)")
    llama_report = compare_main(["--config", str(args.llama_config), "--out", str(args.out / "llama"),
                                 "--nproc", str(args.nproc)])

    print("\n== 2/3 dyt-bench: DyT backends vs LayerNorm / RMSNorm on this machine")
    bench_main(["--json", str(args.out / "bench.json")])
    bench = json.loads((args.out / "bench.json").read_text())

    sections = []
    for build in (wav2vec2_base, llama_125m):
        name, model, target, role_of = build()
        print(f"\n== 3/3 convert_norms on {name}")
        params = sum(p.numel() for p in model.parameters())
        to_dyt = convert_norms(model, target, role_of=role_of)
        print(to_dyt)
        back = convert_norms(model, "layernorm" if "wav2vec2" in name else "rmsnorm")
        print(f"and back: {len(back.replaced)} DyT layers -> {back.target}")
        sections.append((name, params, to_dyt, back))
        del model

    machine = bench["machine"]
    llama_section = llama_report.read_text().replace("](", "](llama/").replace("# LLaMA: RMSNorm vs DyT", "## LLaMA pretraining: RMSNorm vs DyT")
    lines = [
        "# DyT demo report",
        "",
        f"Machine: {machine['device']}, {machine['threads']} threads, torch {machine['torch']}.",
        "",
        llama_section,
        "",
    ]
    for shape, results in bench["kernels"].items():
        lines += [
            f"## DyT vs LayerNorm / RMSNorm, {shape} {bench['dtype']} (median; ratios to F.layer_norm and F.rms_norm)",
            "",
            "```",
            format_kernels(results),
            "```",
        ]
    lines += [
        "",
        "## Norm conversion of real architectures",
        "",
        "| model | parameters | replaced with DyT | by original type | left alone | converted back |",
        "|---|---|---|---|---|---|",
    ]
    for name, params, to_dyt, back in sections:
        kinds = ", ".join(f"{n} x {t.rsplit('.', 1)[-1]}" for t, n in to_dyt.counts().items())
        left = ", ".join(sorted({a.type.rsplit('.', 1)[-1] for a in to_dyt.left_alone})) or "-"
        lines.append(
            f"| {name} | {params / 1e6:.1f}M | {len(to_dyt.replaced)} | {kinds} | {left} | "
            f"{len(back.replaced)} -> {back.target} |"
        )
    lines += ["", f"Total demo time: {time.perf_counter() - started:.0f} s.", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    print(f"\nreport: {args.out / 'report.md'}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
