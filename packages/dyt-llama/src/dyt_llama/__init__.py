"""LLaMA pretraining with an RMSNorm-versus-DyT switch, launched with DeepSpeed, and
``dyt-llama-compare`` (see docs/llama.md)."""
