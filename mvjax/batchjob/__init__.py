"""The dataset job behind ``python -m mvjax.batch``: a listing of utterances -> one audio file per id.

A layer above :mod:`mvjax.inference` and :mod:`mvjax.serve` (it names voices the way the server's
``--voices`` directory does, :mod:`mvjax.serve.voices`), below the CLI (:mod:`mvjax.cli.batch`).
``listing`` reads and checks the input (every refusal before any work starts), ``records`` owns the
output directory's books (digests, ``results.jsonl``, ``job.json``), ``worker`` is one model
replica that runs rows through the scheduler and hands back encoded results, ``runners`` places
replicas (this process, or an actor pool on Ray Data) and ``job`` is the driver: it decides what
is left to do, retries failures, writes every file and result line, and reports.
"""
