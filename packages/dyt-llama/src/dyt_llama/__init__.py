"""LLaMA pretraining with an RMSNorm-versus-DyT switch, launched with DeepSpeed, and
``dyt-llama-compare`` (see docs/llama.md). ``SPEC``: the recipe's description for the shared
comparison (``dyt.train.recipe.RecipeSpec``), imported on first use so that ``import dyt_llama``
stays light."""


def __getattr__(name: str):
    if name == "SPEC":
        from .recipe import SPEC

        return SPEC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
