"""HyenaDNA and Caduceus with a norm-versus-DyT switch (the recipe lands with its own issue)."""
