"""Finding and reading checkpoints: Hugging Face directories, hub ids and GGUF files."""
