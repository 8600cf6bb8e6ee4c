"""The OpenAI-compatible speech server: HTTP on top of :mod:`mvjax.inference`.

A layer above inference, beside :mod:`mvjax.train` (neither imports the other), below the CLI
(``python -m mvjax.serve`` runs :mod:`mvjax.cli.serve`). ``app`` builds the FastAPI app (routes,
service routes), ``guard`` is the middleware in front of them (limits, API key, cross-site refusal,
access log), ``speech`` answers speech requests (whole or streamed), ``text_stream`` is the WebSocket
that takes text in pieces and streams its audio, ``worker`` is the one model worker that batches
text chunks across requests, ``output`` turns chunks into the audio sent (crossfades, loudness,
DeepFilterNet3), ``voices`` is the registry of named speaker embeddings, ``metrics`` the Prometheus
collectors, ``errors`` the JSON error shape, ``settings`` the limits and defaults; ``static/`` holds
the web page.
"""
