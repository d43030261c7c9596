"""Serving: an OpenAI-compatible HTTP API on rank 0 (http.py, api.py) over a continuously batched step
loop that every rank runs (batcher.py). The entry point is `python -m tpimpi.serve` (__main__.py)."""
