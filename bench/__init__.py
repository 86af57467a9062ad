"""Odin benchmark harness (``python -m bench.run``)."""
