"""The server's side of training: each run is the CLI (`python -m modules.train`) in a child process of its own --
a crash, an out-of-memory or a `kill -9` there never takes the server down -- whose JSON progress lines are read
into a `TrainingRun`. Runs belong to the user who started them (on a shared server nobody else can read or stop
one). One run at a time: a run takes the GPU through the job queue, so generation requests made meanwhile wait
behind it with a visible reason, and the inference models are parked in RAM first (they come back without a
reload from disk); with the `training_shares_gpu` setting the run starts at once and generation goes on beside it.
Every run keeps a folder: its config (TOML), log, progress lines, states, samples and an owner file."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from modules.core import paths
from modules.core.fileio import atomic_write_text
from modules.training import config as train_config
from modules.training.plan import make_plan

log = logging.getLogger("webui.training")

ACTIVE = ("queued", "starting", "running", "stopping")


class RunBusyError(RuntimeError):
    """A second run while one trains."""


class RunNotFoundError(LookupError):
    pass


class TrainingRun:
    """One run's live state, from its progress lines."""

    def __init__(self, run_id: int, method: str, cfg, run_dir: Path, owner: str | None, plan_summary: dict):
        self.id = run_id
        self.method = method
        self.cfg = cfg
        self.run_dir = run_dir
        self.owner = owner
        self.plan = plan_summary
        self.state = "queued"
        self.created = time.time()
        self.started = self.finished = None
        self.step = 0
        self.total_steps = plan_summary.get("total_steps", 0)
        self.epoch = 0
        self.loss = self.loss_avg = self.lr = self.it_s = self.eta_s = None
        self.peak_memory = None
        self.losses: list[tuple[int, float, float]] = []
        self.evals: list[dict] = []  # captioner runs: (tag, step, epoch, BLEU-1..4, ROUGE-L, CIDEr) per evaluation
        self.examples: list[dict] = []  # the latest evaluation's example captions (reference, before, now)
        self.samples: list[str] = []
        self.outputs: list[str] = []
        self.states: list[str] = []
        self.error: str | None = None
        self.exit_code: int | None = None
        self.proc: subprocess.Popen | None = None
        self.gate = None  # the queue job holding the GPU for the run
        self.ending: str | None = None
        self.stop_requested = False
        self.log_tail: deque[str] = deque(maxlen=40)
        self._lock = threading.Lock()
        self.finished_event = threading.Event()

    # -- progress lines -----------------------------------------------------------------------------------
    def apply(self, event: dict) -> None:
        kind = event.get("event")
        with self._lock:
            if kind == "start":
                self.state = "stopping" if self.stop_requested else "running"
                self.total_steps = event.get("total_steps", self.total_steps)
                self.step = event.get("step", self.step)
            elif kind == "step":
                for key in ("step", "total_steps", "epoch", "loss", "loss_avg", "lr", "it_s", "eta_s", "peak_memory"):
                    if key in event:
                        setattr(self, key, event[key])
                self.losses.append((event["step"], event["loss"], event["loss_avg"]))
            elif kind == "sample":
                self.samples.append(event["path"])
            elif kind == "eval":
                self.evals.append({"tag": event.get("tag"), "step": event["step"], "epoch": event.get("epoch"),
                                   **event["metrics"]})
                self.examples = list(event.get("examples") or [])
            elif kind == "saved":
                self.outputs.append(event["path"])
            elif kind == "state":
                self.states.append(event["path"])
            elif kind == "error":
                self.error = event.get("message")
            elif kind in ("stopped", "done"):
                self.ending = kind  # the state once the process has ended and its files are listed

    def snapshot(self, detail: bool = True) -> dict[str, Any]:
        with self._lock:
            out = {
                "id": self.id, "method": self.method, "state": self.state, "owner": self.owner,
                "output_name": self.cfg.output_name, "base_model": self.plan.get("base_model"),
                "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
                "loss": self.loss, "loss_avg": self.loss_avg, "learning_rate": self.lr, "it_s": self.it_s,
                "eta_s": self.eta_s, "peak_memory": self.peak_memory, "samples": list(self.samples),
                "outputs": list(self.outputs), "states": list(self.states), "error": self.error,
                "exit_code": self.exit_code, "run_dir": str(self.run_dir), "created": self.created,
                "started": self.started, "finished": self.finished,
            }
            if detail:
                out["losses"] = [{"step": s, "loss": v, "loss_avg": a} for s, v, a in self.losses]
                out["evals"] = [dict(e) for e in self.evals]
                out["examples"] = [dict(e) for e in self.examples]
                out["config"] = {k: v for k, v in vars(self.cfg).items()}
                out["plan"] = self.plan
                out["log_tail"] = list(self.log_tail)
            return out

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def textinfo(self) -> str:
        with self._lock:
            where = f"step {self.step}/{self.total_steps}" if self.state == "running" else self.state
        return f"training run {self.id} is using the GPU, {where}"


def _finished_state(run: TrainingRun, code: int) -> str:
    if run.ending and code == 0:
        return run.ending
    if code == 0:
        return "done"
    if run.stop_requested and code in (-signal.SIGTERM, -signal.SIGKILL):
        return "stopped"
    return "failed"


class RunManager:
    """Starts, lists, reads and stops the server's runs."""

    def __init__(self, root: Path, models_dir: Path, *, queue=None, park: Callable[[], Any] | None = None,
                 shares_gpu: Callable[[], bool] = lambda: False, on_finished: Callable[[TrainingRun], Any] = None,
                 python: str = sys.executable, extra_env: dict | None = None,
                 output_dirs: dict[str, Path] | None = None, default_device: str = "auto"):
        self.root = Path(root)
        self.models_dir = Path(models_dir)
        self.default_device = default_device  # the server's --device, unless a request names one
        self.output_dirs = output_dirs or {}  # "lora" / "checkpoint" / "embedding" -> the server's folder
        self.queue = queue
        self.park = park
        self.shares_gpu = shares_gpu
        self.on_finished = on_finished
        self.python = python
        self.extra_env = extra_env or {}
        self._lock = threading.Lock()
        self._runs: dict[int, TrainingRun] = {}
        self._load_past()

    # -- what exists ------------------------------------------------------------------------------------
    def _load_past(self) -> None:
        """Runs of earlier server sessions, read back from their folders (config, owner, progress lines)."""
        runs_dir = self.root / "runs"
        if not runs_dir.is_dir():
            return
        for folder in sorted(runs_dir.iterdir()):
            if not folder.name.isdigit() or not (folder / "config.toml").is_file():
                continue
            try:
                values = train_config.read_toml(folder / "config.toml")
                cfg = train_config.TrainConfig(**values)
                meta = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
            except (train_config.TrainConfigError, TypeError, ValueError, OSError):
                continue
            run = TrainingRun(int(folder.name), cfg.method, cfg, folder, meta.get("owner"), meta.get("plan", {}))
            progress = folder / "progress.jsonl"
            if progress.is_file():
                for line in progress.read_text(encoding="utf-8", errors="replace").splitlines():
                    try:
                        run.apply(json.loads(line))
                    except (ValueError, KeyError):
                        continue
            if run.ending:
                run.state = run.ending
            elif run.state in ACTIVE:
                run.state = "stopped" if run.states else "failed"  # the server went away during the run
            run.finished_event.set()
            self._runs[run.id] = run

    def _next_id(self) -> int:
        return max(self._runs, default=0) + 1

    def list(self, owner: str | None) -> list[TrainingRun]:
        with self._lock:
            return [r for r in sorted(self._runs.values(), key=lambda r: r.id) if r.owner == owner]

    def get(self, run_id: int, owner: str | None) -> TrainingRun:
        with self._lock:
            run = self._runs.get(run_id)
        if run is None or run.owner != owner:
            raise RunNotFoundError(f"no training run {run_id}")
        return run

    def active(self) -> TrainingRun | None:
        with self._lock:
            return next((r for r in self._runs.values() if r.active), None)

    # -- starting ---------------------------------------------------------------------------------------
    def check(self, method: str, values: dict[str, Any]):
        """The config and plan a request would run with; TrainConfigError / DatasetError before anything starts."""
        if method not in train_config.METHODS:
            raise train_config.TrainConfigError(f"unknown training method {method!r} (one of "
                                                f"{', '.join(train_config.METHODS)})")
        values = dict(values)
        for key in ("run_dir", "models_dir", "method"):
            if key in values:
                raise train_config.TrainConfigError(f"{key} is set by the server")
        cfg = train_config.from_dict({"device": self.default_device, **values, "method": method,
                                      "models_dir": str(self.models_dir)})
        kind = ("captioner" if cfg.method == "captioner" else "embedding" if cfg.method == "embedding"
                else "lora" if cfg.is_lora else "checkpoint")
        if not cfg.output_dir and kind in self.output_dirs:
            cfg = replace(cfg, output_dir=str(self.output_dirs[kind]))
        if cfg.resume:
            cfg = replace(cfg, resume=str(self._resume_dir(cfg.resume)))
        plan = make_plan(cfg)
        if cfg.sample_prompts:
            from modules.training import samples
            samples.read_prompts(cfg.sample_prompts, cfg.resolution)
        return cfg, plan

    def _resume_dir(self, text: str) -> Path:
        """`resume` may name a run of this server by its id, or a state/run folder."""
        if text.isdigit():
            with self._lock:
                run = self._runs.get(int(text))
            if run is None:
                raise train_config.TrainConfigError(f"resume: no training run {text}")
            return run.run_dir
        return Path(text)

    def start(self, method: str, values: dict[str, Any], owner: str | None) -> TrainingRun:
        cfg, plan = self.check(method, values)
        with self._lock:
            busy = next((r for r in self._runs.values() if r.active), None)
            if busy is not None:
                raise RunBusyError(f"training run {busy.id} is still {busy.state}: stop it or wait until it ends "
                                   "(one run at a time)")
            run_id = self._next_id()
            run_dir = self.root / "runs" / f"{run_id:04d}"
            cfg = replace(cfg, run_dir=str(run_dir))
            run = TrainingRun(run_id, method, cfg, run_dir, owner, plan.summary())
            self._runs[run_id] = run
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        atomic_write_text(run_dir / "run.json", json.dumps({"owner": owner, "plan": run.plan}, indent=1))
        if self.queue is not None and not self.shares_gpu():
            run.gate = self.queue.submit(lambda job: self._run_gated(run, job), kind="training", owner=owner)
        else:
            threading.Thread(target=self._run_child, args=(run,), name=f"training-{run_id}", daemon=True).start()
        return run

    def resume(self, run_id: int, changes: dict[str, Any], owner: str | None) -> TrainingRun:
        """A new run continuing run `run_id` from its last state: its config, with `changes` applied."""
        old = self.get(run_id, owner)
        values = {k: v for k, v in vars(old.cfg).items() if k not in ("run_dir", "models_dir", "method")}
        values.update(changes)
        values["resume"] = str(run_id)
        return self.start(old.method, values, owner)

    def _run_gated(self, run: TrainingRun, job) -> dict:
        """The queue job that holds the GPU for a run: park the inference models, run, wait, show why."""
        if run.stop_requested:
            with run._lock:
                run.state = "stopped"
                run.finished = time.time()
            run.finished_event.set()
            return run.snapshot(detail=False)
        if self.park is not None:
            self.park()
        threading.Thread(target=self._run_child, args=(run,), name=f"training-{run.id}", daemon=True).start()
        while not run.finished_event.wait(0.25):
            job.textinfo = run.textinfo()
        return run.snapshot(detail=False)

    def _command(self, run: TrainingRun) -> list[str]:
        return [self.python, "-m", "modules.train", run.method, "--config_file", str(run.run_dir / "config.toml")]

    def _run_child(self, run: TrainingRun) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.extra_env)
        with run._lock:
            run.state = "stopping" if run.stop_requested else "starting"
            run.started = time.time()
        log_file = open(run.run_dir / "train.log", "a", encoding="utf-8")
        final = "failed"
        try:
            run.proc = subprocess.Popen(self._command(run), cwd=paths.REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
            if run.stop_requested:
                run.proc.send_signal(signal.SIGTERM)
            err = threading.Thread(target=self._pump_stderr, args=(run, log_file), daemon=True)
            err.start()
            for line in run.proc.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    run.apply(json.loads(line))
                except (ValueError, KeyError):
                    log_file.write(line + "\n")
            code = run.proc.wait()
            err.join(5)
            final = _finished_state(run, code)
            with run._lock:
                run.exit_code = code
                if final == "failed" and not run.error:
                    tail = [t for t in run.log_tail if t.strip()]
                    run.error = (tail[-1] if tail else f"the training process ended with code {code}")
                    if code == -signal.SIGKILL:
                        run.error = "the training process was killed (out of memory?); the last saved state is kept"
        except OSError as e:
            with run._lock:
                run.error = f"cannot start the training process: {e}"
        finally:
            log_file.close()
            if self.on_finished is not None:  # the new files are listed before the run reads as ended
                try:
                    self.on_finished(run)
                except Exception:  # a refresh failing must not leave the run looking active
                    log.exception("after training run %s", run.id)
            with run._lock:
                run.state = final
                run.finished = time.time()
            log.info("training run %s %s at step %s/%s", run.id, run.state, run.step, run.total_steps)
            run.finished_event.set()

    @staticmethod
    def _pump_stderr(run: TrainingRun, log_file) -> None:
        for line in run.proc.stderr:
            log_file.write(line)
            log_file.flush()
            run.log_tail.append(line.rstrip("\n").removeprefix("error: "))

    # -- stopping ---------------------------------------------------------------------------------------
    def stop(self, run_id: int, owner: str | None) -> TrainingRun:
        """Ask the run to stop: it saves a resumable state and its result so far, then ends."""
        run = self.get(run_id, owner)
        with run._lock:
            if not run.active:
                return run
            run.stop_requested = True
            if run.state in ("running", "starting"):
                run.state = "stopping"
        if run.proc is not None and run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
        return run

    def shutdown(self, timeout: float = 30) -> None:
        for run in list(self._runs.values()):
            if run.proc is not None and run.proc.poll() is None:
                run.stop_requested = True
                run.proc.send_signal(signal.SIGTERM)
        for run in list(self._runs.values()):
            if run.proc is not None:
                try:
                    run.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    run.proc.kill()
