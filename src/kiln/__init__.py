"""kiln: from an open LLM checkpoint to a fast, reliable chatbot."""

__version__ = "0.1.0"
