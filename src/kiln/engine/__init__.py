"""Running models: KV cache, scheduling and the generation loop."""
