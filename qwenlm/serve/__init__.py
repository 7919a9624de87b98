"""`qwen serve`: OpenAI-compatible API, continuous batching, tools, a web chat page."""

from .app import ServerOptions, create_app, serve_in_thread

__all__ = ["ServerOptions", "create_app", "serve_in_thread"]
