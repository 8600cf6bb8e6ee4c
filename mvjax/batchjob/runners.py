"""Where the job's replicas run: in this process (the embedded default) or as a Ray Data actor pool.

A runner is called with a list of :class:`~mvjax.batchjob.worker.Task` and yields an
:class:`~mvjax.batchjob.worker.Outcome` per task as results come back; the driver
(:mod:`mvjax.batchjob.job`) writes them. :class:`LocalRunner` is one
:class:`~mvjax.batchjob.worker.Synthesizer` over all local devices, results as each row finishes.

:class:`RayRunner` runs the rows on Ray Data: ``map_batches`` with a pool of ``workers``
:class:`~mvjax.batchjob.worker.RayWorker` actors, each holding ``devices_per_worker`` GPUs (TPU
chips; CPUs on a cluster with neither) and loading the model once; a task is ``rows_per_task``
rows, run through the actor's engine together, its results streamed back to the driver when the
task ends; Ray Data's streaming executor applies back-pressure (a bounded number of tasks queued
per actor).

A worker process that dies is restarted by Ray (actors restart without limit, Ray Data's default)
and its task is run again, but only :data:`TASK_RETRIES` times: Ray Data's own default is to retry
without limit, so a row that kills its worker every time (a crash in native code, memory it cannot
get) would hold the job forever. A task out of retries fails its block alone (the dataset runs with
``max_errored_blocks = -1``): the other tasks go on, and the driver (:func:`mvjax.batchjob.job.run`)
counts each row that got no result in the round as "its worker process died while running it" and
sends it round again (tasks queued on a worker die with it too). Rounds after the first
(``retry=True``) run one row per task and one task at a time per worker, so a row that shared a
task or a worker with the killer is not blamed a second time, and the killer fails alone and is
recorded as an error once it failed that way twice. An actor that dies while it loads the model
counts against ``DataContext.max_consecutive_actor_init_deaths``; when Ray gives up, the dataset
fails and the driver's next round takes the rows that have no result yet.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Iterator, Optional

from mvjax.batchjob.worker import (
    JobSettings,
    Outcome,
    RayWorker,
    Synthesizer,
    Task,
    outcomes_from_batch,
    task_row,
)
from mvjax.core.errors import MvjaxError

log = logging.getLogger("mvjax")

# Times Ray runs a task again after its worker process died (Ray Data's default: no limit). One retry lets a row
# survive a worker lost by chance (a node taken away, another row's memory spike) within its round.
TASK_RETRIES = 1


class RayUnavailable(MvjaxError, RuntimeError):
    pass


class LocalRunner:
    """The embedded default: one replica in this process on all local devices."""

    workers = 1

    def __init__(self, model: str, settings: JobSettings, digest: str):
        self.synthesizer = Synthesizer(model, settings, digest)

    def __call__(self, tasks: list[Task], retry: bool = False) -> Iterator[Outcome]:
        """``retry``: a later round's rows (no difference here: one process, rows independent in the engine)."""
        return self.synthesizer.run(tasks)

    def close(self) -> None:
        self.synthesizer.close()


class RayRunner:
    """Rows on a Ray cluster (``address``: a running cluster's, ``None``: the one ``RAY_ADDRESS`` names,
    or a new local one); a Ray already initialised in this process (a test's) is used as it is."""

    def __init__(self, model: str, settings: JobSettings, digest: str, address: Optional[str], workers: int,
                 devices_per_worker: int, rows_per_task: int, worker: type = RayWorker):
        """``worker``: the actor class (:class:`~mvjax.batchjob.worker.RayWorker`; tests give a stand-in, which the
        Ray workers import by its module's name)."""
        try:
            import ray
            import ray.data  # noqa: F401 - Ray Data is the [data] extra: fail here, not at the first round
        except ImportError:
            raise RayUnavailable("Ray is not installed: pip install 'mvjax[scale]' (Ray Data) to use --ray") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=True, log_to_driver=True)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the job draws its own
        self.model, self.settings, self.digest = model, settings, digest
        self.workers, self.rows_per_task, self.worker = workers, rows_per_task, worker
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) > 0:
            kind, self.resources = "GPU", {"num_gpus": devices_per_worker}
        elif resources.get("TPU", 0) > 0:
            kind, self.resources = "TPU", {"resources": {"TPU": devices_per_worker}}
        else:
            kind, self.resources = "CPU", {"num_cpus": devices_per_worker}
        if resources.get(kind, 0) < workers * devices_per_worker:
            log.warning("the Ray cluster has %g %s; %d workers x %d need %d: the pool waits for more (an "
                        "autoscaler's nodes)", resources.get(kind, 0), kind, workers, devices_per_worker,
                        workers * devices_per_worker)

    def __call__(self, tasks: list[Task], retry: bool = False) -> Iterator[Outcome]:
        """Outcomes of ``tasks`` as their Ray tasks end; a task whose worker died :data:`TASK_RETRIES` + 1 times
        yields nothing for its rows. ``retry``: the rows of a later round, run one per task and one task at a time
        per worker: tasks queued on a worker die with it, so a row waiting behind the killer would be lost again."""
        ray = self.ray
        per_task = 1 if retry else self.rows_per_task
        blocks = max(1, math.ceil(len(tasks) / per_task))
        dataset = ray.data.from_items([task_row(t) for t in tasks], override_num_blocks=blocks)
        with warnings.catch_warnings():
            # Ray 2.60 takes max_task_retries only among the extra remote arguments, which it says are deprecated
            # (to be replaced by named parameters, none of which sets task retries yet).
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            dataset = dataset.map_batches(
                self.worker, fn_constructor_kwargs={"model": self.model, "settings": self.settings,
                                                    "digest": self.digest},
                batch_size=per_task, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(self.workers, blocks),
                                                   max_tasks_in_flight_per_actor=1 if retry else None),
                max_task_retries=TASK_RETRIES, **self.resources)
        dataset.context.max_errored_blocks = -1  # this dataset's own copy of the context: a dead task drops its rows
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield from outcomes_from_batch(batch)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
