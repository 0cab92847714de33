"""The OpenAI-compatible HTTP server, its metrics and the playground page."""
