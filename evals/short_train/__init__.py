"""Train short, test long: small models trained at a short context, evaluated far beyond it."""
