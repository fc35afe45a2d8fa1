"""The prefork pool Verdict's workers run (`worker_pool` in app/queue.py): Celery's own, with one fix. During a
broker outage the worker's main loop is stuck reconnecting and reads no task results; when it resumes, the time-limit
timers of tasks that finished meanwhile fire before their results are read, and kill the (idle, or by then busy)
pool process (issue 11 item 4; tests/integration/test_broker_restart.py). Here a time limit first checks whether the
task's process has a result waiting, and if so gives the loop a moment to read it: a task that finished is never
cancelled, one that is still running is cancelled as before."""

from __future__ import annotations

import contextlib
from typing import Any

from billiard import util as billiard_util  # type: ignore[import-untyped]
from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool as CeleryTaskPool

# How long a time limit waits for the loop to read a result that is already in the pipe.
_RESULT_GRACE_SECONDS = 0.5


class ResultFirstAsynPool(AsynPool):  # type: ignore[misc]
    def _create_worker_process(self, i: int) -> Any:
        # Every pool process is forked here (at start, and when one is replaced). Its first act (Celery's
        # set_pdeathsig: billiard has cffi parse a C declaration) loads cffi's C parser (pycparser) and builds it: done
        # once here in the parent, it is shared by the pool processes instead of built in each (issue 15 item 4).
        with contextlib.suppress(OSError):
            billiard_util.get_pdeathsig()
        return super()._create_worker_process(i)

    def register_with_event_loop(self, hub: Any) -> Any:
        self._verdict_hub = hub
        return super().register_with_event_loop(hub)

    def _on_soft_timeout(self, job: int, soft: float, hard: float, hub: Any) -> None:
        if self._result_waiting(job):
            self._tref_for_id[job] = hub.call_later(_RESULT_GRACE_SECONDS, self._on_soft_timeout, job, soft, hard,
                                                    hub)
            return
        super()._on_soft_timeout(job, soft, hard, hub)

    def _on_hard_timeout(self, job: int) -> None:
        hub = getattr(self, "_verdict_hub", None)
        if hub is not None and self._result_waiting(job):
            self._tref_for_id[job] = hub.call_later(_RESULT_GRACE_SECONDS, self._on_hard_timeout, job)
            return
        super()._on_hard_timeout(job)

    def _result_waiting(self, job: int) -> bool:
        """Whether the process that ran `job` (still unfinished in the cache) has written something not yet read."""
        result = self._cache.get(job)
        pid = getattr(result, "_worker_pid", None)
        if pid is None:
            return False
        process = next((p for p in self._pool if p.pid == pid), None)
        reader = getattr(getattr(process, "outq", None), "_reader", None)
        if reader is None:
            return False
        try:
            return bool(reader.poll(0))
        except (OSError, EOFError):
            return False


class TaskPool(CeleryTaskPool):  # type: ignore[misc]
    Pool = ResultFirstAsynPool
