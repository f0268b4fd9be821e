"""HyenaDNA and Caduceus pretraining with a norm-versus-DyT switch, and DNA classification evals."""
