"""The LLaMA pretraining task for the shared harness: config, model, data, loss."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dyt.baselines import rewrites_built_model
from dyt.train import ConfigError, TrainConfig

from .data import DataConfig, build_datasets
from .model import Llama, ModelConfig, count_parameters


@dataclass
class LlamaConfig:
    """LLaMA pretraining (dyt-llama). model.norm switches RMSNorm / LayerNorm / DyT."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds the model's context "
                              f"(model.max_seq_len={self.model.max_seq_len}): lower one or raise the other")


ROLE_NAMES = {"attention_norm": "attention", "ffn_norm": "ffn",  # this recipe's model.Llama
              "self_attn_layer_norm": "attention", "ffn_layer_norm": "ffn"}  # fairseq2's LLaMA
"""A LLaMA norm's module name -> its DyT role; every other norm (the final one) is ``final``."""


def role_of(path: str) -> str:
    """The DyT role of a LLaMA norm by its module path (convert_norms on a built model: this recipe's
    or fairseq2's; the recipe's SPEC.role_of)."""
    return ROLE_NAMES.get(path.rsplit(".", 1)[-1], "final")


class LlamaTask:
    def __init__(self, config: LlamaConfig):
        self.config = config
        model = config.model
        # Every data error surfaces here, before any engine or training starts.
        self.train_rows, self.validation_rows, self.tokenizer = build_datasets(
            config.data, model.vocab_size, model.max_seq_len
        )

    @property
    def partitioned_init(self) -> bool:
        """Under ZeRO-3 the harness may build this model shard by shard (``Llama.reset_parameters``
        goes through ``init_normal_``); not a normalization-free baseline whose ``apply_norm_free``
        rewrites the built model (:func:`dyt.baselines.rewrites_built_model`): it needs the model whole."""
        return not rewrites_built_model(self.config.model.norm)

    def build_model(self) -> Llama:
        model = Llama(self.config.model)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"LLaMA {count_parameters(model) / 1e6:.2f}M parameters, norm={self.config.model.norm.kind}, "
                  f"{len(self.train_rows)} training sequences of {self.config.data.seq_len} tokens", flush=True)
        return model

    def data_identity(self) -> dict[str, str]:
        """A sha256 of the tokenizer's vocabulary (token -> id) and merges: a BPE trained again in
        another cache (``data.cache_dir``, ``$DYT_CACHE``) must come out the same for a ``--resume``.
        Read from its content, not its JSON text, whose layout ``tokenizers`` releases have changed
        (0.20: merges as pairs, not "a b" strings)."""
        merges = json.loads(self.tokenizer.to_str())["model"].get("merges", [])
        content = {"vocab": sorted(self.tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]),
                   "merges": [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in merges]}
        return {"tokenizer sha256": hashlib.sha256(json.dumps(content).encode()).hexdigest()}

    def train_dataset(self):
        return self.train_rows

    def eval_dataset(self):
        return self.validation_rows

    def collate(self, rows):
        return torch.stack(rows)

    def loss(self, model, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, {"units": float(targets.numel())}

    def eval_metrics(self, loss: float) -> dict[str, float]:
        return {"eval/perplexity": math.exp(min(loss, 50.0))}
