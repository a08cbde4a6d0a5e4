"""Serving: the continuous-batching engine (`engine.py`, usable without HTTP) and the
OpenAI-compatible HTTP server on top of it (`server.py`, the `[serve]` extra)."""
