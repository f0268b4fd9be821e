"""wav2vec 2.0 pretraining with a LayerNorm-versus-DyT switch (the recipe lands with its own issue)."""
