"""Serving: an OpenAI-compatible HTTP API and a web chat page over the continuous-batching scheduler.

    tinylm serve runs/chat/final --port 8000

``build_server`` loads a model directory and starts its scheduler; ``create_app`` is the ASGI app
(Starlette) over it; ``serve`` runs it with uvicorn. See docs/serve.md.
"""
