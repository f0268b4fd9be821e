"""The LLaMA recipe as the shared comparison and the demo see it (``dyt_llama.SPEC``)."""

from dyt.train.compare import pretraining_summary
from dyt.train.recipe import Metric, ModelSpec, RecipeSpec

from .task import LlamaConfig, role_of

SPEC = RecipeSpec(
    name="llama",
    title="LLaMA",
    package="dyt_llama",
    train_module="dyt_llama.train",
    compare_module="dyt_llama.compare",
    config_class=LlamaConfig,
    models=(ModelSpec("llama", "LLaMA", "configs/tiny.yaml", ("rmsnorm", "dyt")),),
    summarize=pretraining_summary,
    metrics=(Metric("eval_loss", "validation loss"),),
    role_of=role_of,
    throughput_unit="tokens/s",
)
