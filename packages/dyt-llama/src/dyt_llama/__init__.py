"""LLaMA pretraining with an RMSNorm-versus-DyT switch (the recipe lands with its own issue)."""
