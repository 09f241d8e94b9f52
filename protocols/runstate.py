"""The state of a run folder: who runs it, how it ended, and the one-line errors of the commands.

* **Status.** ``status.json`` says ``running`` (with the process id and host), ``finished``,
  ``interrupted`` (Ctrl-C: where the run stands and how to resume), ``diverged`` (the reason and
  how to rerun) or ``failed`` (an unexpected error), always with a message.
* **Lock.** ``run.lock`` (created atomically, ``O_EXCL``) names the process that works in the
  folder; a second process refuses and names it. A lock left by a process that no longer exists
  (same host: its pid is gone or belongs to a newer process; other host: no heartbeat for
  :data:`STALE_AFTER_S`) is taken over. The holder refreshes the lock's time every
  :data:`HEARTBEAT_S`.
* **Divergence guard** (:class:`GuardSettings`, TOML table ``[guard]``): besides NaN/inf, a
  weight beyond ``max_abs_weight`` or a training error at chance for ``chance_evaluations``
  evaluations in a row after having been below it stops the run as ``diverged``.
* **Errors.** :func:`cli` runs a command's body and turns the package's own errors (config,
  data, run files, paths) into one line on stderr naming the file and the fix, exit status 2,
  before Brian2's excepthook can wrap them in its bug-report banner; ``diverged`` is 3 and
  Ctrl-C 130.
* **Stop requests.** A sweep's runs execute in Dask worker threads, which no signal reaches;
  the sweep asks them to stop by token (:func:`request_stop`, :class:`stoppable`), and
  :func:`check_interrupt` raises in those threads at their next iteration.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

#: seconds between refreshes of a held lock's time
HEARTBEAT_S = 30.0
#: a lock from another host whose time is older than this is stale
STALE_AFTER_S = 600.0

#: print phase messages (False with ``--quiet``)
VERBOSE = True


def say(message: str) -> None:
    """One line about what the run is doing now, on stderr (silent with ``--quiet``)."""
    if VERBOSE:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class RunError(ValueError):
    """A run folder or run file that cannot be used as it is: in use by another process,
    corrupt, or asked for something it cannot give. The message names the file and the fix."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT): the message says where the run stands and how to resume."""

    def __init__(self, message: str, recorded: str | os.PathLike | None = None):
        super().__init__(message)
        self.message = message
        #: the run folders whose status.json already says 'interrupted'
        self.recorded = {Path(recorded).resolve()} if recorded else set()

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------------------------
# Files read by the package


def read_json(path: str | os.PathLike, what: str, fix: str):
    """The JSON content of ``path``; a RunError naming the file, what it is and the fix."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: the {what} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not valid JSON"
        raise RunError(f"{path}: the {what} cannot be read ({reason}); {fix}") from None


# ----------------------------------------------------------------------------------------------
# Status


def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused
    pid from the original process; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def write_status(run_dir: str | os.PathLike, status: str, message: str, **extra) -> None:
    """``status.json``: the state, a message, the time, and the process id and host."""
    from protocols.records import atomic_write_json

    atomic_write_json(Path(run_dir) / "status.json",
                      {"status": status, "message": message, "time": time.time(),
                       "pid": os.getpid(), "host": _host(), **extra})


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """The content of ``status.json`` (None when there is none); RunError when unreadable."""
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return None
    record = read_json(path, "run status", "delete it (the next run writes it anew)")
    if not isinstance(record, dict) or "status" not in record:
        raise RunError(f"{path}: the run status has no 'status'; delete it (the next run "
                       f"writes it anew)")
    return record


# ----------------------------------------------------------------------------------------------
# Lock


_HELD: dict[str, "RunLock"] = {}


class RunLock:
    """``run.lock`` of a run folder, held by one process (re-entrant within it)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "run.lock"
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- owner ------------------------------------------------------------------------------
    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": _host(), "process_start": _process_start(os.getpid()),
                "since": time.time(), "command": " ".join(sys.argv)}

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _alive(self, owner: dict) -> bool:
        if not owner or "pid" not in owner:
            return False
        if owner.get("host") != _host():
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False
            return age < STALE_AFTER_S
        pid = int(owner["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        start = _process_start(pid)
        return owner.get("process_start") is None or start is None or \
            start == owner.get("process_start")

    # -- acquire / release ------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
            return held
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner == {} and attempt == 0:
                    time.sleep(0.2)  # being written by its owner
                    continue
                if owner is None:
                    continue
                if owner.get("pid") == os.getpid() and owner.get("host") == _host():
                    self._remove_stale()
                    continue
                if self._alive(owner):
                    since = time.strftime("%Y-%m-%d %H:%M:%S",
                                          time.localtime(float(owner.get("since", 0))))
                    raise RunError(
                        f"{self.run_dir} is in use by process {owner['pid']} on "
                        f"{owner.get('host')} (since {since}: {owner.get('command', '?')}); wait "
                        f"for it to end, or use another --out. If that process is gone, delete "
                        f"{self.path}") from None
                say(f"{self.run_dir}: taking over the lock of process {owner.get('pid')} on "
                    f"{owner.get('host')}, which has ended")
                self._remove_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._mine(), fh)
            self.count = 1
            _HELD[key] = self
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                            name=f"heartbeat {self.run_dir.name}")
            self._thread.start()
            return self
        raise RunError(f"{self.path}: could not take the run's lock; delete it if no process "
                       f"works in {self.run_dir}")

    def _remove_stale(self) -> None:
        aside = self.path.with_name(f".run.lock.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
            os.unlink(aside)
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        held = _HELD.get(str(self.path.resolve()))
        if held is not None and held is not self:  # a re-entrant acquire returned ``held``
            return held.release()
        self.count -= 1
        if self.count > 0:
            return
        _HELD.pop(str(self.path.resolve()), None)
        self._stop.set()
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == _host():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class run_guard:
    """Hold the lock of ``run_dir`` while the body runs; record how it ends when it does not
    finish: Ctrl-C as ``interrupted`` (with ``phase`` and how to resume), an unexpected error as
    ``failed`` (only when this process had marked the run ``running``)."""

    def __init__(self, run_dir: str | os.PathLike, phase: str, resume: str = ""):
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.resume = resume or "rerun the same command to resume"
        self.lock = RunLock(run_dir)

    def __enter__(self) -> "run_guard":
        self.lock = self.lock.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                return False
            if isinstance(exc, RunInterrupted):
                if self.run_dir.resolve() not in exc.recorded:
                    write_status(self.run_dir, "interrupted", exc.message)
                    exc.recorded.add(self.run_dir.resolve())
                return False
            if isinstance(exc, KeyboardInterrupt):
                message = f"interrupted during {self.phase}; {self.resume}"
                write_status(self.run_dir, "interrupted", message)
                raise RunInterrupted(message, recorded=self.run_dir) from None
            if isinstance(exc, Exception) and not isinstance(exc, RunError):
                try:
                    status = read_status(self.run_dir)
                except RunError:
                    status = None
                if status and status["status"] == "running" and status.get("pid") == os.getpid():
                    write_status(self.run_dir, "failed",
                                 f"{type(exc).__name__} during {self.phase}: {exc}")
            return False
        finally:
            self.lock.release()


# ----------------------------------------------------------------------------------------------
# Divergence guard


@dataclass(frozen=True)
class GuardSettings:
    """When a fine-tuning run counts as diverged, besides non-finite weights or outputs."""

    #: stop when any weight or threshold exceeds this in magnitude (0: off); every array of the
    #: committed results stays below 25
    max_abs_weight: float = 1000.0
    #: training error at or above this counts as chance level (10 classes: 0.9, less a margin)
    chance_error: float = 0.85
    #: stop after this many evaluations in a row at chance, once an evaluation was below it
    #: (0: off)
    chance_evaluations: int = 3

    def __post_init__(self):
        if self.max_abs_weight < 0 or not 0 < self.chance_error <= 1 or \
                self.chance_evaluations < 0:
            raise ValueError("guard: max_abs_weight must be >= 0, chance_error in (0, 1], "
                             "chance_evaluations >= 0")


class DivergenceGuard:
    """Applies :class:`GuardSettings` to a run's parameters and evaluations."""

    def __init__(self, settings: GuardSettings, rows=()):
        self.settings = settings
        self.below = False
        self.at_chance = 0
        for row in rows:  # a resumed run continues the count
            self.evaluation(row["train_error"])

    def weights(self, params) -> str | None:
        """The reason to stop, when a weight or threshold is beyond the bound."""
        bound = self.settings.max_abs_weight
        if not bound:
            return None
        for i, p in enumerate(params):
            if p is None:
                continue
            for what, array in (("weight", p.weights), ("threshold", p.thresholds)):
                largest = float(abs(array).max())
                if not math.isfinite(largest) or largest > bound:
                    return (f"a {what} of layer {i} reached {largest:.3g}, beyond "
                            f"guard.max_abs_weight = {bound:g}")
        return None

    def evaluation(self, train_error: float) -> str | None:
        """The reason to stop, when the training error stays at chance after having been below."""
        s = self.settings
        if not s.chance_evaluations:
            return None
        if train_error < s.chance_error:
            self.below = True
            self.at_chance = 0
            return None
        if self.below:
            self.at_chance += 1
            if self.at_chance >= s.chance_evaluations:
                return (f"the training error is at chance ({train_error:.3f} >= "
                        f"guard.chance_error = {s.chance_error:g}) for {self.at_chance} "
                        f"evaluations in a row after having been below it")
        return None


# ----------------------------------------------------------------------------------------------
# Paths


def check_writable(folder: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``folder`` if needed and check that a file can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"{folder}: cannot write there ({err.strerror or err}); choose a "
                       f"writable folder with {option}") from None
    return folder


# ----------------------------------------------------------------------------------------------
# Command-line errors


_PATH_ERRNOS = {errno.ENOSPC: "free disk space, then rerun the same command to resume",
                errno.EDQUOT: "free disk space (quota), then rerun the same command to resume",
                errno.EACCES: "choose a folder you can write to (--out)",
                errno.EPERM: "choose a folder you can write to (--out)",
                errno.EROFS: "choose a folder on a writable file system (--out)",
                errno.ENOENT: "check the path",
                errno.ENOTDIR: "check the path: a part of it is a file",
                errno.EISDIR: "check the path: it is a folder"}


def cli(body, argv=None) -> int:
    """Run ``body(argv)``; the package's errors become one line on stderr and an exit status:
    2 for configuration, data, run-file and path errors, 3 for divergence, 130 for Ctrl-C."""
    from protocols.config import ConfigError
    from protocols.datasets import DatasetError

    def line(kind: str, err) -> None:
        text = " ".join(str(err).split())
        print(f"{kind}: {text}", file=sys.stderr, flush=True)

    global _SIGNALLED
    _SIGNALLED = False
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C (and SIGTERM, as from a batch system) raise KeyboardInterrupt wherever the
        # command is, also inside a Brian2 run, which would otherwise stop the simulation and
        # carry on; the interrupt is reported below
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _interrupt)
    try:
        return body(argv)
    except KeyboardInterrupt as err:
        line("interrupted", err if isinstance(err, RunInterrupted) and str(err)
             else "stopped by Ctrl-C; rerun the same command to resume")
        return 130
    except RunError as err:
        line("run folder error", err)
        return 2
    except DatasetError as err:
        line("data error", err)
        return 2
    except (ConfigError, ValueError) as err:
        line("configuration error", err)
        return 2
    except RuntimeError as err:
        if type(err).__name__ == "TrainingDiverged":  # a RuntimeError; by name: no train import
            line("stopped", err)
            return 3
        raise
    except OSError as err:
        fix = _PATH_ERRNOS.get(err.errno)
        if fix is None:
            raise
        where = err.filename or "a file of the run"
        line("file error", f"{where}: {err.strerror}; {fix}")
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_SIGNALLED = False
#: True inside deferred_interrupts(): a first Ctrl-C waits for the end of the block
_DEFERRING = False


def _interrupt(signum, frame):
    global _SIGNALLED
    first = not _SIGNALLED
    _SIGNALLED = True  # remembered: a KeyboardInterrupt raised inside a weakref callback or
    if _DEFERRING and first:  # a __del__ is swallowed by Python ("Exception ignored in ...")
        return
    raise KeyboardInterrupt


class deferred_interrupts:
    """Hold a first Ctrl-C (under :func:`cli`) until the block is done, then raise it: for
    steps that leave a broken object behind when cut half-way, such as starting a Dask cluster
    (whose exit hook then fails with a traceback). A second Ctrl-C raises at once."""

    def __enter__(self) -> "deferred_interrupts":
        global _DEFERRING
        self.previous = _DEFERRING
        _DEFERRING = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        global _DEFERRING
        _DEFERRING = self.previous
        if exc_type is None and _SIGNALLED and not _DEFERRING:
            raise KeyboardInterrupt
        return False


def check_interrupt() -> None:
    """Raise KeyboardInterrupt when a Ctrl-C arrived that Python may have swallowed, or when
    the task this thread runs was asked to stop (:func:`request_stop`)."""
    if _SIGNALLED or stop_requested():
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# Stopping the tasks of a sweep
#
# A sweep's runs execute in Dask worker threads, where no signal arrives: the sweep's process
# takes the Ctrl-C (or SIGTERM) and asks every worker to stop the tasks of its sweep. Each task
# runs under its sweep's token; the token is in the stop set of the worker's process once the
# sweep asked, and check_interrupt() (called every iteration and every pre-training batch) then
# raises in that task's thread only, so another sweep's tasks on a shared cluster carry on.

_STOPPED_TOKENS: set[str] = set()
_TASK = threading.local()


def request_stop(token: str) -> None:
    """Ask the tasks of this process that run under ``token`` to stop at their next check
    (run on every worker by the sweep through ``Client.run``)."""
    _STOPPED_TOKENS.add(token)


def stop_requested() -> bool:
    """Whether the task of the calling thread was asked to stop."""
    token = getattr(_TASK, "token", None)
    return token is not None and token in _STOPPED_TOKENS


class stoppable:
    """Run the body as a task of ``token``: :func:`check_interrupt` in this thread raises
    KeyboardInterrupt once :func:`request_stop` was called with it."""

    def __init__(self, token: str | None):
        self.token = token

    def __enter__(self) -> "stoppable":
        self.previous = getattr(_TASK, "token", None)
        _TASK.token = self.token
        return self

    def __exit__(self, *exc) -> bool:
        _TASK.token = self.previous
        return False
