"""Stand-in Ray Data workers for the dataset job's tests (Ray workers import them by this module's name).

:class:`KillerWorker` answers every row at once with placeholder audio, no model, except the row
:data:`KILLER`: a task holding it ends the worker process (``os._exit``) every time it runs, as a crash
in native code would.
"""

import os
import socket

from mvjax.batchjob.worker import Outcome, outcomes_batch

KILLER = "killer"


class KillerWorker:
    def __init__(self, model, settings, digest):
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        if KILLER in ids:
            os._exit(1)
        return outcomes_batch([Outcome(i, None, b"RIFF" + i.encode(), audio_seconds=1.0, wall_seconds=0.01,
                                       worker=self.name) for i in ids])
