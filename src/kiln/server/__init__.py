"""The HTTP server: TGI- and OpenAI-compatible APIs over the AsyncEngine."""
