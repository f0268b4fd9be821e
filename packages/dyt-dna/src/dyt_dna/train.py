"""``python -m dyt_dna.train --config recipes/dna/hyena-tiny.yaml --set model.norm=dyt``
(also under ``deepspeed --module`` and ``torchrun -m``)."""

from dyt.train import run_recipe

from .task import DnaConfig, DnaPretrainTask


def main() -> None:
    run_recipe(DnaConfig, DnaPretrainTask, prog="dyt_dna.train", ends_process=True)


if __name__ == "__main__":
    main()
