"""The serving layer: one request lifecycle under every API (no HTTP in it)."""
