"""``python -m dyt_llama.train --config recipes/llama/tiny.yaml --set model.norm=dyt``
(also under ``deepspeed --module`` and ``torchrun -m``)."""

from dyt.train import run_recipe

from .task import LlamaConfig, LlamaTask


def main() -> None:
    run_recipe(LlamaConfig, LlamaTask, prog="dyt_llama.train", ends_process=True)


if __name__ == "__main__":
    main()
