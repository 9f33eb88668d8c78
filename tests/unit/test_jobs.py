"""The job queue's rules: strict FIFO on one worker, per-job interrupt and skip, failures that leave the
worker serving, bounded queueing, progress/ETA arithmetic and throttled previews."""
from __future__ import annotations

import threading
import time

import pytest

from modules.core.jobs import (
    DuplicateTaskError,
    Job,
    JobInterrupted,
    JobQueue,
    JobSkipped,
    JobStatus,
    QueueFullError,
    QueueShutDownError,
)

WAIT = 5.0  # generous upper bound for a thread hand-off on a loaded machine; tests finish far sooner


@pytest.fixture
def queue():
    jobs = JobQueue()
    yield jobs
    jobs.shutdown(wait=True, timeout=WAIT)


def blocker():
    """A job function that holds the worker until `release` is set, and says when it started."""
    started, release = threading.Event(), threading.Event()

    def run(job: Job) -> str:
        started.set()
        assert release.wait(WAIT)
        return "released"

    return run, started, release


def test_jobs_run_in_submission_order(queue):
    order: list[int] = []
    gate, started, release = blocker()
    queue.submit(gate, kind="gate")
    jobs = [queue.submit(lambda job, n=n: order.append(n), kind="txt2img") for n in range(5)]
    assert started.wait(WAIT)
    assert [job.position for job in queue.pending()] == [0, 1, 2, 3, 4]
    release.set()
    for job in jobs:
        job.wait(WAIT)
    assert order == [0, 1, 2, 3, 4]


def test_only_one_job_runs_at_a_time(queue):
    running = 0
    most = 0
    lock = threading.Lock()

    def work(job: Job) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    jobs = [queue.submit(work, kind="txt2img") for _ in range(4)]
    for job in jobs:
        job.wait(WAIT)
    assert most == 1


def test_interrupt_stops_only_that_job(queue):
    stepping = threading.Event()

    def sample(job: Job) -> str:
        job.begin_iteration(0, 1)
        for step in range(1, 10_000):
            stepping.set()
            job.step(step, 10_000)
            time.sleep(0.001)
        return "finished"

    first = queue.submit(sample, kind="txt2img", owner="alice")
    second = queue.submit(lambda job: "bob's image", kind="txt2img", owner="bob")
    assert stepping.wait(WAIT)
    first.interrupt()
    with pytest.raises(JobInterrupted):
        first.wait(WAIT)
    assert first.status == JobStatus.INTERRUPTED and first.interrupted
    assert second.wait(WAIT) == "bob's image"
    assert second.status == JobStatus.DONE and not second.interrupted


def test_a_job_may_catch_the_interrupt_and_return_what_it_has(queue):
    def sample(job: Job) -> list[int]:
        made = []
        try:
            for n in range(3):
                job.begin_iteration(n, 3)
                job.step(1, 1)
                made.append(n)
                if n == 1:
                    job.interrupt()
        except JobInterrupted:
            pass
        return made

    job = queue.submit(sample, kind="txt2img")
    assert job.wait(WAIT) == [0, 1]
    assert job.status == JobStatus.DONE and job.interrupted


def test_interrupting_a_queued_job_means_it_never_runs(queue):
    gate, started, release = blocker()
    queue.submit(gate, kind="gate")
    ran = []
    doomed = queue.submit(lambda job: ran.append(job.id), kind="txt2img")
    doomed.interrupt()
    release.set()
    with pytest.raises(JobInterrupted):
        doomed.wait(WAIT)
    assert ran == [] and doomed.started is None


def test_skip_stops_the_current_iteration_only(queue):
    def batch(job: Job) -> list[tuple[int, int]]:
        reached: list[tuple[int, int]] = []
        for n in range(3):
            job.begin_iteration(n, 3)
            try:
                for step in range(1, 5):
                    job.step(step, 4)
                    reached.append((n, step))
                    if n == 1 and step == 2:
                        job.skip()
            except JobSkipped:
                continue
        return reached

    job = queue.submit(batch, kind="txt2img")
    reached = job.wait(WAIT)
    assert [step for n, step in reached if n == 0] == [1, 2, 3, 4]
    assert [step for n, step in reached if n == 1] == [1, 2]
    assert [step for n, step in reached if n == 2] == [1, 2, 3, 4]
    assert job.status == JobStatus.DONE and not job.skipped


def test_a_failing_job_leaves_the_worker_serving(queue):
    def broken(job: Job) -> None:
        raise ValueError("bad prompt")

    failed = queue.submit(broken, kind="txt2img")
    fine = queue.submit(lambda job: 42, kind="txt2img")
    assert fine.wait(WAIT) == 42
    assert failed.status == JobStatus.FAILED
    assert isinstance(failed.error, ValueError)
    with pytest.raises(ValueError, match="bad prompt"):
        failed.wait(0)


def test_wait_returns_the_result_and_times_out_while_running(queue):
    gate, started, release = blocker()
    job = queue.submit(gate, kind="gate")
    assert started.wait(WAIT)
    with pytest.raises(TimeoutError):
        job.wait(0.01)
    release.set()
    assert job.wait(WAIT) == "released"


def test_a_full_queue_refuses_more_jobs():
    jobs = JobQueue(max_queued=2)
    try:
        gate, started, release = blocker()
        jobs.submit(gate, kind="gate")
        assert started.wait(WAIT)  # the running job does not count as waiting
        jobs.submit(lambda job: None, kind="a")
        jobs.submit(lambda job: None, kind="b")
        with pytest.raises(QueueFullError):
            jobs.submit(lambda job: None, kind="c")
        release.set()
    finally:
        jobs.shutdown(wait=True, cancel=False, timeout=WAIT)


def test_task_ids_are_unique_while_in_use(queue):
    gate, started, release = blocker()
    job = queue.submit(gate, kind="txt2img", task_id="task(abc)")
    assert job.id == "task(abc)" and queue.get("task(abc)") is job
    with pytest.raises(DuplicateTaskError):
        queue.submit(lambda job: None, kind="txt2img", task_id="task(abc)")
    release.set()
    job.wait(WAIT)
    again = queue.submit(lambda job: "second", kind="txt2img", task_id="task(abc)")
    assert again.wait(WAIT) == "second" and queue.get("task(abc)") is again


def test_progress_and_eta_math():
    now = [1000.0]
    job = Job(lambda job: None, kind="txt2img", clock=lambda: now[0])
    assert job.progress == 0.0 and job.eta_relative is None  # queued: nothing measured
    job.started = now[0]
    job.status = JobStatus.RUNNING
    job.begin_iteration(1, 4)
    job.step(5, 10)
    assert job.progress == pytest.approx((1 + 5 / 10) / 4)
    now[0] += 30.0  # 30 s for 37.5% -> 80 s in all -> 50 s left
    assert job.eta_relative == pytest.approx(50.0)
    job.begin_iteration(3, 4)
    job.step(10, 10)
    assert job.progress == 1.0


def test_preview_runs_every_n_steps_only():
    job = Job(lambda job: None, kind="txt2img", preview_every=3)
    calls: list[int] = []
    for step in range(1, 11):
        job.step(step, 10, preview=lambda step=step: calls.append(step) or f"image@{step}")
    assert calls == [3, 6, 9]
    assert job.current_image == "image@9" and job.preview_id == 3

    silent = Job(lambda job: None, kind="txt2img", preview_every=0)
    silent.step(1, 1, preview=lambda: pytest.fail("previews are disabled"))
    assert silent.current_image is None


def test_a_failing_preview_does_not_fail_the_job():
    job = Job(lambda job: None, kind="txt2img", preview_every=1)

    def broken_preview():
        raise RuntimeError("VAE decode failed")

    job.step(1, 2, preview=broken_preview)
    assert job.sampling_step == 1 and job.current_image is None


def test_current_and_current_for_follow_the_owner(queue):
    gate, started, release = blocker()
    alice = queue.submit(gate, kind="txt2img", owner="alice")
    bob = queue.submit(lambda job: "bob", kind="txt2img", owner="bob")
    assert started.wait(WAIT)
    assert queue.current() is alice
    assert queue.current_for("alice") is alice
    assert queue.current_for("bob") is bob and bob.status == JobStatus.QUEUED
    assert queue.current_for("carol") is None
    release.set()
    bob.wait(WAIT)
    assert queue.current_for("alice") is alice and alice.status == JobStatus.DONE


def test_finished_jobs_are_kept_in_a_bounded_history():
    jobs = JobQueue(history=2)
    try:
        done = [jobs.submit(lambda job: None, kind="x") for _ in range(3)]
        for job in done:
            job.wait(WAIT)
        assert jobs.get(done[0].id) is None
        assert jobs.get(done[1].id) is done[1] and jobs.get(done[2].id) is done[2]
    finally:
        jobs.shutdown(wait=True, timeout=WAIT)


def test_cancel_takes_a_queued_job_out(queue):
    gate, started, release = blocker()
    queue.submit(gate, kind="gate")
    assert started.wait(WAIT)
    first = queue.submit(lambda job: 1, kind="txt2img")
    second = queue.submit(lambda job: 2, kind="txt2img")
    assert queue.cancel(first.id) is True
    assert first.status == JobStatus.INTERRUPTED and queue.pending() == [second]
    assert second.position == 0
    assert queue.cancel("no-such-job") is False
    release.set()
    assert second.wait(WAIT) == 2


def test_estimated_wait_uses_recent_durations():
    now = [0.0]
    jobs = JobQueue(clock=lambda: now[0])
    try:
        def timed(job: Job) -> None:
            now[0] += 10.0  # each of these jobs "takes" 10 s on the fake clock

        jobs.submit(timed, kind="txt2img").wait(WAIT)
        gate, started, release = blocker()
        jobs.submit(gate, kind="gate")
        assert started.wait(WAIT)
        first = jobs.submit(timed, kind="txt2img")
        second = jobs.submit(timed, kind="txt2img")
        # The running "gate" job has no steps and no history of its own: all kinds average to 10 s.
        assert jobs.estimated_wait(first.id) == pytest.approx(10.0)
        assert jobs.estimated_wait(second.id) == pytest.approx(20.0)
        release.set()
    finally:
        jobs.shutdown(wait=True, cancel=False, timeout=WAIT)


def test_shutdown_cancels_waiting_jobs_and_refuses_new_ones():
    jobs = JobQueue()
    gate, started, release = blocker()
    running = jobs.submit(gate, kind="gate")
    waiting = jobs.submit(lambda job: "never", kind="txt2img")
    assert started.wait(WAIT)
    jobs.shutdown(wait=False)
    assert waiting.status == JobStatus.INTERRUPTED and running.interrupted
    release.set()
    jobs.shutdown(wait=True, timeout=WAIT)
    assert running.status == JobStatus.DONE  # it finished its work; it never stepped to see the interrupt
    assert waiting.status == JobStatus.INTERRUPTED and waiting.started is None
    with pytest.raises(QueueShutDownError):
        jobs.submit(lambda job: None, kind="txt2img")
