"""chathub: a streaming, real-time chat backend for LLM conversations."""

__version__ = "0.1.0"
