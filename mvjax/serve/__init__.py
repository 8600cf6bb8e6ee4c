"""The OpenAI-compatible speech server: HTTP on top of :mod:`mvjax.inference`.

A layer above inference, beside :mod:`mvjax.train` (neither imports the other), below the CLI.
``voices.py`` is the registry of named voices (speaker embeddings) the server's ``/v1/voices``
endpoints and its ``--voices DIR`` option use.
"""
