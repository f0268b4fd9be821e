"""wav2vec 2.0 (fairseq2 parts) pretraining with a LayerNorm-versus-DyT switch, and speech evals.
``SPEC``: the recipe's description for the shared comparison (``dyt.train.recipe.RecipeSpec``),
imported on first use so that ``import dyt_wav2vec2`` stays light."""


def __getattr__(name: str):
    if name == "SPEC":
        from .recipe import SPEC

        return SPEC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
