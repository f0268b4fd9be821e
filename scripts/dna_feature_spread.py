"""How much the pooled features a DNA classification head sees differ between windows.

For each run folder of ``dyt-dna-compare`` / ``dyt_dna.train``: the backbone untrained (the run's
config, seed 0) and pretrained (its weights), pooled over 64 validation windows of a built-in task.
Prints the features' RMS, their standard deviation across windows (the signal a linear head can
use) and the ratio of the two. Used in docs/dna.md to explain why DyT backbones fine-tune slower.

    python scripts/dna_feature_spread.py RUN_DIR [RUN_DIR ...] [--task species]
"""

import argparse
from pathlib import Path

import torch

from dyt.errors import help_description, user_errors
from dyt_dna.data import load_task, tokens
from dyt_dna.eval import backbone_builder


@user_errors("dna_feature_spread.py")
def main() -> None:
    parser = argparse.ArgumentParser(description=help_description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--task", default="species", help="built-in task whose validation windows are pooled")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args()
    batch = tokens(load_task(args.task, args.window, 100).validation["sequence"][: args.windows])
    print("| run | backbone | feature RMS | std across windows | ratio |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        for pretrained in (False, True):
            torch.manual_seed(0)
            model = backbone_builder(run, pretrained)[1]().eval()
            with torch.no_grad():
                pooled = model.pool(model.features(batch), batch)
            rms = pooled.pow(2).mean().sqrt().item()
            spread = pooled.std(0).mean().item()
            print(f"| {run.name} | {'pretrained' if pretrained else 'random init'} | {rms:.3f} | {spread:.3f} | {spread / rms:.3f} |")


if __name__ == "__main__":
    main()
