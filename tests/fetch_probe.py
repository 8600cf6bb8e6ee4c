"""``python -m tests.fetch_probe RECORD train ARGS...``: ``python -m mvjax.finetune train ARGS``, recording the
training rows this process reads.

It runs the command in this process (not in the supervised child :func:`mvjax.train.job.supervise` would start),
with :meth:`mvjax.train.split_reader.SplitReader.tokens_rows` and ``spk_rows`` wrapped to note the row ids of every
read; at the end ``RECORD.<process index>.json`` holds ``{"tokens": [[ids of one read], ...], "spk": [...]}``.
"""

import json
import os
import sys

from mvjax.train.job import CHILD_ENV

os.environ[CHILD_ENV] = "1"  # run here: the wrapped reader lives in this process

import jax  # noqa: E402 - after the environment above

from mvjax.cli.common import exit_now  # noqa: E402
from mvjax.cli.finetune import main  # noqa: E402
from mvjax.train.split_reader import SplitReader  # noqa: E402

READS = {"tokens": [], "spk": []}


def _recording(name, read):
    def wrapped(self, ids):
        READS[name].append([int(i) for i in ids])
        return read(self, ids)

    return wrapped


if __name__ == "__main__":
    SplitReader.tokens_rows = _recording("tokens", SplitReader.tokens_rows)
    SplitReader.spk_rows = _recording("spk", SplitReader.spk_rows)
    record, argv = sys.argv[1], sys.argv[2:]
    rc = main(argv)
    with open(f"{record}.{jax.process_index()}.json", "w") as fh:
        json.dump(READS, fh)
    exit_now(rc)
