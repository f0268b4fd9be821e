"""The README's main job: a small LN-vs-DyT comparison on real data, ending in one report.

1. LLaMA (tiny config) pretrained on Shakespeare + Austen with RMSNorm and with DyT, 2 ranks under
   the deepspeed launcher (``dyt-llama-compare``): table, loss curves, alpha, S-curves.
2. wav2vec 2.0 (tiny) pretrained on synthetic speech with LayerNorm and with DyT, then the
   pretraining task on held-out speech and a keyword probe on unseen voices and real recordings,
   each beside the same model untrained (``dyt-wav2vec2-compare --evals contrastive probe``).
3. HyenaDNA and Caduceus (tiny) pretrained on bacterial genomes with their norm and with DyT, then
   fine-tuned to tell species on held-out strains (``dyt-dna-compare``).
4. ``dyt-bench``: DyT's backends against LayerNorm / RMSNorm on this machine.
5. ``convert_norms`` on real architectures (torchaudio's wav2vec 2.0 Base, fairseq2's LLaMA).

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
from dyt_dna.compare import main as dna_compare
from dyt_llama.compare import main as compare_main
from dyt_wav2vec2.compare import main as wav2vec2_compare


def wav2vec2_base():
    import torchaudio

    return "torchaudio wav2vec2_base", torchaudio.models.wav2vec2_base(), NormConfig(kind="dyt"), None, "layernorm"


def llama_125m():
    from fairseq2.models.llama import LLaMAConfig, create_llama_model

    config = LLaMAConfig(
        model_dim=768, max_seq_len=2048, vocab_size=32000, num_layers=12,
        num_attn_heads=12, num_key_value_heads=12, ffn_inner_dim=2048,
    )
    policy = NormConfig(kind="dyt", bias=False, alpha_policy="llm")

    def role(path: str) -> str:
        return "attention" if "self_attn" in path else "ffn" if "ffn" in path else "final"

    return "fairseq2 LLaMA (125M-size config)", create_llama_model(config), policy, role, "rmsnorm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--llama-config", type=Path, default=Path("recipes/llama/tiny.yaml"))
    parser.add_argument("--nproc", type=int, default=2, help="ranks for the training runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}  # each part's wall time, for the report

    def part(name: str, work):
        begun = time.perf_counter()
        result = work()
        seconds[name] = time.perf_counter() - begun
        return result

    print("== 1/5 LLaMA pretraining, RMSNorm vs DyT (tiny config, 2 ranks, deepspeed launcher)")
    reports = [part("LLaMA", lambda: compare_main(["--config", str(args.llama_config), "--out", str(args.out / "llama"),
                                                   "--nproc", str(args.nproc)]))]
    print("\n== 2/5 wav2vec 2.0 pretraining, LayerNorm vs DyT, the pretraining task held out, a keyword probe")
    reports.append(part("wav2vec 2.0", lambda: wav2vec2_compare(
        ["--out", str(args.out / "wav2vec2"), "--nproc", str(args.nproc), "--evals", "contrastive", "probe"])))
    print("\n== 3/5 HyenaDNA and Caduceus pretraining, their norm vs DyT, and species classification")
    reports.append(part("DNA", lambda: dna_compare(["--out", str(args.out / "dna"), "--nproc", str(args.nproc)])))

    print("\n== 4/5 dyt-bench: DyT backends vs LayerNorm / RMSNorm on this machine")
    part("dyt-bench", lambda: bench_main(["--json", str(args.out / "bench.json")]))
    bench = json.loads((args.out / "bench.json").read_text())

    def conversions():
        found = []
        for build in (wav2vec2_base, llama_125m):
            name, model, target, role_of, baseline = build()
            print(f"\n== 5/5 convert_norms on {name}")
            params = sum(p.numel() for p in model.parameters())
            to_dyt = convert_norms(model, target, role_of=role_of)
            print(to_dyt)
            back = convert_norms(model, baseline)
            print(f"and back: {len(back.replaced)} DyT layers -> {back.target}")
            found.append((name, params, to_dyt, back))
            del model
        return found

    sections = part("conversions", conversions)

    machine = bench["machine"]
    lines = [
        "# DyT demo report",
        "",
        f"Machine: {machine['device']}, {machine['threads']} threads, torch {machine['torch']}.",
        "",
    ]
    for report in reports:  # each recipe's report, one heading level down, image links rebased
        text = report.read_text().replace("](", f"]({report.parent.name}/")
        lines += [("#" + text) if text.startswith("# ") else text, ""]
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
    lines += ["", "| demo part | wall time (s) |", "|---|---|"]
    lines += [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    lines += ["", f"Total demo time: {time.perf_counter() - started:.0f} s.", ""]
    (args.out / "report.md").write_text("\n".join(lines))
    print(f"\nreport: {args.out / 'report.md'}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
