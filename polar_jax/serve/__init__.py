"""Serving: the continuous-batching engine (`engine.py`, usable without HTTP) and the
OpenAI-compatible HTTP server on top of it (the `[serve]` extra): `server.py` the process,
`api.py` the routes, `protocol.py` the wire format, `text.py` detokenizing and chat templates."""
