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
per actor). A worker process that dies is restarted by Ray and its task is run again: Ray Data's
own actor fault tolerance (its actor pools set ``max_restarts`` and ``max_task_retries`` to -1,
no limit; passing other values is deprecated from Ray 2.60 on). An actor that dies while it loads
the model counts against ``DataContext.max_consecutive_actor_init_deaths``; when Ray gives up,
the dataset fails and the driver's next round takes the rows that have no result yet.
"""

from __future__ import annotations

import logging
import math
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


class RayUnavailable(MvjaxError, RuntimeError):
    pass


class LocalRunner:
    """The embedded default: one replica in this process on all local devices."""

    workers = 1

    def __init__(self, model: str, settings: JobSettings, digest: str):
        self.synthesizer = Synthesizer(model, settings, digest)

    def __call__(self, tasks: list[Task]) -> Iterator[Outcome]:
        return self.synthesizer.run(tasks)

    def close(self) -> None:
        self.synthesizer.close()


class RayRunner:
    """Rows on a Ray cluster (``address``: a running cluster's, ``None``: the one ``RAY_ADDRESS`` names,
    or a new local one); a Ray already initialised in this process (a test's) is used as it is."""

    def __init__(self, model: str, settings: JobSettings, digest: str, address: Optional[str], workers: int,
                 devices_per_worker: int, rows_per_task: int):
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
        self.workers, self.rows_per_task = workers, rows_per_task
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

    def __call__(self, tasks: list[Task]) -> Iterator[Outcome]:
        ray = self.ray
        blocks = max(1, math.ceil(len(tasks) / self.rows_per_task))
        dataset = ray.data.from_items([task_row(t) for t in tasks], override_num_blocks=blocks)
        dataset = dataset.map_batches(
            RayWorker, fn_constructor_kwargs={"model": self.model, "settings": self.settings, "digest": self.digest},
            batch_size=self.rows_per_task, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(self.workers, blocks)),
            **self.resources)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield from outcomes_from_batch(batch)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
