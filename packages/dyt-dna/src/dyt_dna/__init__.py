"""HyenaDNA and Caduceus pretraining with a norm-versus-DyT switch, and DNA classification evals.
``SPEC``: the recipe's description for the shared comparison (``dyt.train.recipe.RecipeSpec``),
imported on first use so that ``import dyt_dna`` stays light."""


def __getattr__(name: str):
    if name == "SPEC":
        from .recipe import SPEC

        return SPEC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
