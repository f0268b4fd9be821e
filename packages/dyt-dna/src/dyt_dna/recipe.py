"""The DNA recipe as the shared comparison and the demo see it (``dyt_dna.SPEC``): two models, each
with its published norm as the baseline."""

from dyt.train.compare import pretraining_summary
from dyt.train.recipe import Metric, ModelSpec, RecipeSpec

from .task import DnaConfig

SPEC = RecipeSpec(
    name="dna",
    title="DNA",
    package="dyt_dna",
    train_module="dyt_dna.train",
    compare_module="dyt_dna.compare",
    config_class=DnaConfig,
    models=(  # name: the config's model.arch
        ModelSpec("hyena", "HyenaDNA", "configs/hyena-tiny.yaml", ("layernorm", "dyt")),
        ModelSpec("caduceus", "Caduceus", "configs/caduceus-tiny.yaml", ("rmsnorm", "dyt")),
    ),
    summarize=pretraining_summary,
    metrics=(Metric("eval_loss", "validation loss", digits=4),),
    throughput_unit="bases/s",
)
