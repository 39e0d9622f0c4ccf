"""tinylm: build a small chat model end to end, the way the big labs do."""

__version__ = "0.1.0"
