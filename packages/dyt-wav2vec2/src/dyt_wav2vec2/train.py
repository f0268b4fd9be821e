"""``python -m dyt_wav2vec2.train --config recipes/wav2vec2/tiny.yaml --set model.norm=dyt``
(also under ``deepspeed --module`` and ``torchrun -m``)."""

from dyt.train import run_recipe

from .task import Wav2Vec2PretrainConfig, Wav2Vec2PretrainTask


def main() -> None:
    run_recipe(Wav2Vec2PretrainConfig, Wav2Vec2PretrainTask, prog="dyt_wav2vec2.train", ends_process=True)


if __name__ == "__main__":
    main()
