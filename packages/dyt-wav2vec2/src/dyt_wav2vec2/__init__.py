"""wav2vec 2.0 (fairseq2 parts) pretraining with a LayerNorm-versus-DyT switch, and speech evals."""
