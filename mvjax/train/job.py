"""A training job of several ``jax.distributed`` processes that stops cleanly when one of them dies.

Two things notice a dead process. A collective (a step's gradient reduction) fails at once when a
peer's connection closes: :func:`peer_failure` turns that error into one :class:`JobError` line.
A process that waits outside a collective (writing a checkpoint, reading data) learns it from JAX's
coordination service (missed heartbeats, or the coordinator itself gone), whose only answer is to
abort the interpreter with a fatal log and a native stack trace, and JAX offers no hook to change
that. So each process of a multi-process ``python -m mvjax.finetune train`` runs the training in a
child (:func:`supervise`): the parent passes the child's output on, minus XLA's native log lines,
and when the child dies without having said why, prints the one line itself. Either way every
surviving process says which checkpoint ``--resume`` continues from, and none hangs (the heartbeat
timeout bounds the wait when a machine vanishes without closing its connections).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import jax

from mvjax.core.errors import MvjaxError
from mvjax.core.parallel import initialize_distributed, requested_processes

# Seconds without a heartbeat after which the coordination service declares a process dead (JAX's default is
# 100): a machine that vanishes without closing its connections (power, network) stops the job this soon.
HEARTBEAT_TIMEOUT_S = 30

_state = {"stopping": False, "resume_hint": "continue it with --resume on every process"}
_lock = threading.Lock()


class JobError(MvjaxError, RuntimeError):
    """Another process of the job stopped: this one stops too."""


def set_resume_hint(text: str) -> None:
    """What the failure line tells the user to do (the loop updates it as checkpoints are written)."""
    _state["resume_hint"] = text


def _message(detail: str) -> str:
    return f"a process of this job stopped ({detail}); the job stops here: {_state['resume_hint']}"


def peer_failure(exc: BaseException) -> Optional[JobError]:
    """The one-line error for a collective that failed because a peer is gone (None for any other error, or
    outside a multi-process job). Marks the job as stopping, so the coordination callback stays quiet."""
    if jax.process_count() == 1 or not isinstance(exc, jax.errors.JaxRuntimeError):
        return None
    with _lock:
        _state["stopping"] = True
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Connection closed by peer" in text or "Connection reset" in text:
        text = "its connection closed"
    elif "heartbeat timeout" in text:
        text = "it stopped sending heartbeats"
    elif len(text) > 200:
        text = text[:200] + "..."
    return JobError(_message(text))


def join(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> bool:
    """:func:`mvjax.core.parallel.initialize_distributed` with this module's failure handling; True if this
    process joined a job of several."""
    if coordinator or requested_processes(num_processes)[0] > 1:
        # CPU devices of several processes reduce over gloo (TCP); accelerators use their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # The preemption service only adds log lines when a peer dies; training saves its own checkpoints.
        jax.config.update("jax_enable_preemption_service", False)
    return initialize_distributed(coordinator, num_processes, process_id, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


CHILD_ENV = "MVJAX_TRAIN_CHILD"
# XLA/absl log lines ("E1208 01:02:39.887368 18571 file.cc:289] ..."), the stack trace of a failed check, and
# the C++ runtime's last words: what a dying process prints natively, none of it the user's business.
_NATIVE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\] |\*\*\* Check failure|    @ +0x|terminate called|"
                     r"  what\(\):|Additional GRPC error|:UNKNOWN:Error received|\[Gloo\] )")


def _multi_process(argv: Sequence[str]) -> bool:
    from mvjax.core.parallel import ClusterError, requested_processes

    if "--coordinator" in argv or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    count = None
    if "--num-processes" in argv:
        try:
            count = int(argv[list(argv).index("--num-processes") + 1])
        except (IndexError, ValueError):
            return False  # argparse says what is wrong
    try:
        return requested_processes(count)[0] > 1
    except ClusterError:
        return False  # the command itself reports it


def latest_checkpoint(run_dir: Path) -> Optional[int]:
    """The newest committed checkpoint of a run on disk (Orbax renames a finished one to its step number)."""
    try:
        steps = [int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit()]
    except OSError:
        return None
    return max(steps) if steps else None


def _latest_checkpoint(argv: Sequence[str]) -> Optional[int]:
    try:
        return latest_checkpoint(Path(argv[list(argv).index("--out") + 1]))
    except (ValueError, IndexError):
        return None


def _die_with_parent() -> None:
    """In the child, before it runs: on Linux, SIGKILL it when the supervising parent dies (a scheduler that kills
    the task kills the parent), so no trainer is left running on its own."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def supervise(argv: Sequence[str]) -> Optional[int]:
    """Run ``python -m mvjax.finetune ARGV`` in a child when it is one process of a multi-process training job
    (the exit status to end with); None when it is not (run it here)."""
    argv = list(argv)
    if os.environ.get(CHILD_ENV) or not argv or argv[0] != "train" or not _multi_process(argv):
        return None
    child = subprocess.Popen([sys.executable, "-m", "mvjax.finetune", *argv], env={**os.environ, CHILD_ENV: "1"},
                             stderr=subprocess.PIPE, text=True, errors="replace", preexec_fn=_die_with_parent)
    said = False
    try:
        for line in child.stderr:
            if _NATIVE.match(line):
                continue
            said = said or line.startswith("error: ")
            sys.stderr.write(line)
            sys.stderr.flush()
        rc = child.wait()
    except KeyboardInterrupt:
        child.kill()
        child.wait()
        rc = 1
    if rc == 0:
        return 0
    if not said:
        _state["resume_hint"] = resume_hint_for(_latest_checkpoint(argv))
        if rc in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT):
            reason = f"this one, killed by signal {-rc}"
        else:  # SIGABRT (XLA's fatal check) or an abort's status: the coordination service saw a peer die
            reason = "JAX's coordination service lost a peer or process 0"
        sys.stderr.write(f"error: {_message(reason)}\n")
    return 1


def resume_hint_for(step: Optional[int]) -> str:
    if step is None:
        return "no checkpoint was written yet; start the run again"
    return f"continue from checkpoint {step} with --resume on every process"
