"""Serving: the inference engine (engine.py, token ids) and the HTTP server (app.py)."""
