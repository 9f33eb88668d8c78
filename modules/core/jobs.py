"""Job queue: one FIFO queue and one worker thread that run every job for the UI and the API alike,
and the Job objects that carry each job's progress, live preview, interrupt/skip flags and result.

One worker means one job touches the GPU at a time, so jobs never fight over memory and the model
manager's leases only ever overlap within a job. Interrupt and skip belong to a job, not to the
process: stopping one user's job cannot stop another's. JSON shaping for A1111's /progress is the API
layer's business; this module keeps plain numbers and objects.
"""
from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from typing import Any, Callable

logger = logging.getLogger("webui.jobs")


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.INTERRUPTED})


class JobStopped(Exception):
    """Base of the exceptions `Job.step` raises to stop work early on the user's request."""


class JobInterrupted(JobStopped):
    """The job was interrupted: stop now (a service may catch it and return what it has)."""


class JobSkipped(JobStopped):
    """The current image was skipped: abandon this iteration and go on with the next one."""


class QueueFullError(RuntimeError):
    """`max_queued` jobs are already waiting."""


class DuplicateTaskError(ValueError):
    """A queued or running job already has the requested task id."""


class QueueShutDownError(RuntimeError):
    """The queue has been shut down and accepts no more jobs."""


def _clear_frames(exc: BaseException | None) -> None:
    # A finished job's error stays in the history; without this its traceback would keep every local
    # of the failed frames alive (latents, activations: gigabytes of GPU memory after an OOM). Line
    # numbers survive, so the traceback still prints.
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


class Job:
    """One unit of work and its live state. The worker sets the status fields; the running function
    reports progress through `begin_iteration` and `step`; anyone may read, `interrupt` or `skip`."""

    _sequence = itertools.count()

    def __init__(
        self,
        fn: Callable[[Job], Any],
        *,
        kind: str,
        owner: str | None = None,
        job_id: str | None = None,
        preview_every: int = 0,
        clock: Callable[[], float] = time.time,
    ):
        self.id = job_id or uuid.uuid4().hex
        self.kind = kind
        self.owner = owner
        self.preview_every = max(0, int(preview_every))
        self.status = JobStatus.QUEUED
        self.position: int | None = None  # place in the queue while queued: 0 runs next
        self.created = clock()
        self.started: float | None = None
        self.finished: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.job_no = 0
        self.job_count = 1
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = ""
        self.current_image: Any = None
        self.preview_id = 0  # bumps with every new preview, so pollers can tell a new image from an old one
        self.interrupted = False
        self.skipped = False
        self.order = next(Job._sequence)
        self._fn: Callable[[Job], Any] | None = fn
        self._clock = clock
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._callbacks: list[Callable[[Job], Any]] = []

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, kind={self.kind!r}, owner={self.owner!r}, status={self.status.value!r})"

    # ------------------------------------------------------------------ called by the running service

    def begin_iteration(self, job_no: int, job_count: int) -> None:
        """Start batch iteration `job_no` (0-based) of `job_count`; clears a skip of the previous one.
        Raises JobInterrupted when the job was interrupted, so no new image is started."""
        with self._lock:
            self.job_no = job_no
            self.job_count = max(1, job_count)
            self.sampling_step = 0
            self.skipped = False
        if self.interrupted:
            raise JobInterrupted(f"job {self.id} was interrupted")

    def step(self, step: int, steps: int, preview: Callable[[], Any] | None = None) -> None:
        """Report that `step` of `steps` sampling steps of this iteration are done.

        Raises JobInterrupted / JobSkipped when the job was interrupted / the iteration skipped. Calls
        `preview()` (which decodes an image, so it is costly) only on every `preview_every`-th step; a
        failing preview is logged and never fails the job.
        """
        with self._lock:
            self.sampling_step = step
            self.sampling_steps = steps
        if self.interrupted:
            raise JobInterrupted(f"job {self.id} was interrupted")
        if self.skipped:
            raise JobSkipped(f"job {self.id}: image {self.job_no + 1} was skipped")
        if preview is None or self.preview_every <= 0 or step <= 0 or step % self.preview_every:
            return
        try:
            image = preview()
        except Exception:
            logger.exception("live preview of job %s failed; sampling goes on", self.id)
            return
        if image is not None:
            with self._lock:
                self.current_image = image
                self.preview_id += 1

    # -------------------------------------------------------------------------------- called by anyone

    def interrupt(self) -> None:
        """Stop this job at its next step (or before it starts, when still queued)."""
        self.interrupted = True

    def skip(self) -> None:
        """Abandon the image being made; the job goes on with its next iteration."""
        self.skipped = True

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    @property
    def progress(self) -> float:
        """0..1 over the whole job: (job_no + step/steps) / job_count; 1 once done."""
        with self._lock:
            if self.status == JobStatus.DONE:
                return 1.0
            fraction = self.sampling_step / self.sampling_steps if self.sampling_steps > 0 else 0.0
            value = (self.job_no + fraction) / max(1, self.job_count)
        return min(1.0, max(0.0, value))

    @property
    def eta_relative(self) -> float | None:
        """Seconds left, extrapolated from the time spent so far and the progress made; 0 once
        finished, None while nothing has been measured yet (queued, or no step done)."""
        if self.done:
            return 0.0
        started = self.started
        progress = self.progress
        if started is None or progress <= 0.0:
            return None
        elapsed = max(0.0, self._clock() - started)
        return max(0.0, elapsed / progress - elapsed)

    def add_done_callback(self, fn: Callable[["Job"], Any]) -> None:
        """Call `fn(job)` once the job has finished (at once, on this thread, when it already has); otherwise on
        the thread that finishes it. How the API awaits a job without holding a thread while it waits."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job finished; return its result or raise its error (JobInterrupted when it
        was interrupted). TimeoutError when it is still queued or running after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.id} is still {self.status.value} after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def snapshot(self) -> dict[str, Any]:
        """The job's state as plain values (for logs, listings and the API layer to shape)."""
        with self._lock:
            state = {
                "id": self.id,
                "kind": self.kind,
                "owner": self.owner,
                "status": self.status.value,
                "position": self.position,
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "job_no": self.job_no,
                "job_count": self.job_count,
                "sampling_step": self.sampling_step,
                "sampling_steps": self.sampling_steps,
                "textinfo": self.textinfo,
                "interrupted": self.interrupted,
                "skipped": self.skipped,
                "preview_id": self.preview_id,
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            }
        state["progress"] = self.progress
        state["eta_relative"] = self.eta_relative
        return state

    # --------------------------------------------------------------------------- called by the worker

    def _run(self) -> None:
        if self.interrupted:
            self._finish(JobStatus.INTERRUPTED, error=JobInterrupted(f"job {self.id} was interrupted before it started"))
            return
        fn = self._fn
        self._fn = None  # the closure may hold a request with images; the job outlives it in the history
        with self._lock:
            self.status = JobStatus.RUNNING
            self.started = self._clock()
        try:
            result = fn(self)
        except JobStopped as exc:
            _clear_frames(exc)
            logger.info("job %s (%s) stopped: %s", self.id, self.kind, exc)
            self._finish(JobStatus.INTERRUPTED, error=exc)
        except BaseException as exc:  # a job's failure, whatever it is, must not end the worker
            logger.error("job %s (%s) failed", self.id, self.kind, exc_info=exc)
            _clear_frames(exc)
            self._finish(JobStatus.FAILED, error=exc)
        else:
            self._finish(JobStatus.DONE, result=result)

    def _finish(self, status: JobStatus, *, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            self.status = status
            self.result = result
            self.error = error
            self.finished = self._clock()
            self.position = None
            if status == JobStatus.INTERRUPTED:
                self.interrupted = self.interrupted or isinstance(error, JobInterrupted)

    def _mark_done(self) -> None:
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a waiter's failure must not break the queue
                logger.exception("a done-callback of job %s failed", self.id)


class JobQueue:
    """Strict FIFO of jobs served by one worker thread, started with the first job (or by `start`)."""

    def __init__(self, max_queued: int = 100, *, history: int = 200, clock: Callable[[], float] = time.time):
        self.max_queued = max_queued
        self.history_size = history
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._active: dict[str, Job] = {}  # queued and running jobs by id
        self._running: Job | None = None
        self._history: OrderedDict[str, Job] = OrderedDict()
        self._durations: dict[str, deque[float]] = {}
        self._worker: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        with self._cond:
            if self._closed:
                raise QueueShutDownError("the job queue has been shut down")
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="webui-job-worker", daemon=True)
                self._worker.start()

    def submit(
        self,
        fn: Callable[[Job], Any],
        *,
        kind: str,
        owner: str | None = None,
        task_id: str | None = None,
        preview_every: int = 0,
    ) -> Job:
        """Queue `fn(job)` and return its Job at once."""
        with self._cond:
            if self._closed:
                raise QueueShutDownError("the job queue has been shut down")
            if len(self._queue) >= self.max_queued:
                raise QueueFullError(f"{len(self._queue)} jobs are already waiting; try again when some have finished")
            if task_id is not None and task_id in self._active:
                raise DuplicateTaskError(f"task id {task_id!r} belongs to a job that is still queued or running")
            job = Job(fn, kind=kind, owner=owner, job_id=task_id, preview_every=preview_every, clock=self._clock)
            self._history.pop(job.id, None)  # a reused task id now names the new job
            job.position = len(self._queue)
            self._queue.append(job)
            self._active[job.id] = job
            self.start()
            self._cond.notify_all()
        logger.debug("queued job %s (%s) for %s at position %d", job.id, kind, owner, job.position)
        return job

    def cancel(self, job_id: str) -> bool:
        """Take a queued job out of the queue as interrupted; the running job is interrupted instead.
        False when no queued or running job has that id."""
        with self._cond:
            job = self._active.get(job_id)
            if job is None:
                return False
            job.interrupt()
            if job is not self._running:
                self._queue.remove(job)
                self._renumber()
                job._finish(JobStatus.INTERRUPTED, error=JobInterrupted(f"job {job.id} was cancelled before it started"))
                self._retire(job)
            return True

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._active.get(job_id) or self._history.get(job_id)

    def current(self) -> Job | None:
        with self._cond:
            return self._running

    def pending(self) -> list[Job]:
        """Queued jobs in the order they will run; each job's `position` is its index here."""
        with self._cond:
            return list(self._queue)

    def current_for(self, owner: str | None) -> Job | None:
        """The owner's running job, else the owner's most recently submitted one (queued or finished)."""
        with self._cond:
            if self._running is not None and self._running.owner == owner:
                return self._running
            mine = [job for job in itertools.chain(self._queue, self._history.values()) if job.owner == owner]
            return max(mine, key=lambda job: job.order, default=None)

    def estimated_wait(self, job_id: str) -> float | None:
        """Seconds until a queued job should start: what the running job has left plus the average
        duration of recent jobs of each kind ahead of it. None when there is no history to go by."""
        with self._cond:
            job = self._active.get(job_id)
            if job is None or job is self._running:
                return 0.0 if job is not None else None
            total = 0.0
            running = self._running
            if running is not None:
                left = running.eta_relative
                if left is None:
                    average = self._average_duration(running.kind)
                    if average is None:
                        return None
                    left = max(0.0, average - (self._clock() - (running.started or self._clock())))
                total += left
            for ahead in self._queue:
                if ahead is job:
                    return total
                average = self._average_duration(ahead.kind)
                if average is None:
                    return None
                total += average
            return total

    def shutdown(self, wait: bool = True, *, cancel: bool = True, timeout: float | None = None) -> None:
        """Stop accepting jobs. With `cancel` (the default) queued jobs end as interrupted without
        running and the running job is interrupted; without it the worker first drains the queue.
        With `wait`, block until the worker has exited."""
        with self._cond:
            self._closed = True
            if cancel:
                while self._queue:
                    job = self._queue.popleft()
                    job.interrupt()
                    job._finish(JobStatus.INTERRUPTED, error=JobInterrupted(f"job {job.id} was cancelled: the queue shut down"))
                    self._retire(job)
                if self._running is not None:
                    self._running.interrupt()
            self._cond.notify_all()
            worker = self._worker
        if wait and worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    # --------------------------------------------------------------------------------------- worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                self._renumber()
                job.position = None
                self._running = job
            job._run()
            with self._cond:
                self._running = None
                if job.status == JobStatus.DONE and job.started is not None and job.finished is not None:
                    self._durations.setdefault(job.kind, deque(maxlen=20)).append(job.finished - job.started)
                self._retire(job)

    def _retire(self, job: Job) -> None:
        # Lock held: the job leaves the active set for the bounded history, then its waiters wake.
        self._active.pop(job.id, None)
        self._history[job.id] = job
        while len(self._history) > self.history_size:
            self._history.popitem(last=False)
        job._mark_done()
        self._cond.notify_all()

    def _renumber(self) -> None:
        for index, queued in enumerate(self._queue):
            queued.position = index

    def _average_duration(self, kind: str) -> float | None:
        samples = self._durations.get(kind) or [d for durations in self._durations.values() for d in durations]
        return sum(samples) / len(samples) if samples else None
