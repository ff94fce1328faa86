"""Run a command for a task: stream its output into a logger and leave no process behind.

The child starts in a session of its own, so one signal reaches the whole process group
(dvc, the shell it starts, torchrun). torchrun puts each worker in yet another session, so
the group alone does not cover them: every child also inherits a unique tag in its
environment, and cleanup stops every process that carries the tag or descends from the
child. Cleanup runs on any exception raised while the command runs, which includes
KeyboardInterrupt and the TerminationSignal Prefect raises when a run is cancelled, and
also after a normal exit, so that a stage cannot leave stray processes behind.

POSIX only (process groups, /proc).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil

from unet.cli import QUIET_ENVIRONMENT

# Environment variable whose value marks every process started for one command.
TAG_VARIABLE = "UNET_FLOW_PROCESS_TAG"
TAIL_LINES = 40
# Prefect's runner sends SIGKILL 30 s after its SIGTERM; cleanup must finish before then.
DEFAULT_GRACE_PERIOD_S = 20.0


class CommandFailed(RuntimeError):
    """A command exited with a non-zero status; the message ends with the tail of its output."""

    def __init__(self, command: Sequence[str], returncode: int, tail: Sequence[str], hint: str = ""):
        self.command = list(command)
        self.returncode = returncode
        self.tail = list(tail)
        summary = f"`{shlex.join(self.command)}` exited with status {returncode}"
        if hint:
            summary += f"; {hint}"
        super().__init__(f"{summary}. Last {len(self.tail)} line(s) of its output:\n" + "\n".join(self.tail))


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Build the environment for a child: this one, telemetry off, and this interpreter's bin first on PATH.

    PATH puts the interpreter's folder first so that `dvc`, `unet` and `torchrun`, which
    dvc.yaml commands call by name, come from the environment the flow runs in.
    """
    env = dict(os.environ)
    env.update(QUIET_ENVIRONMENT)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def run_command(
    command: Sequence[str],
    *,
    cwd: Path,
    logger: logging.Logger | logging.LoggerAdapter,
    env: Mapping[str, str] | None = None,
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S,
    hint: str = "",
) -> None:
    """Run `command` in `cwd`, log each line of its merged stdout and stderr, raise CommandFailed on failure.

    `hint` is added to the failure message: what to do about it. Every process the command
    started is gone when this returns or raises.
    """
    tag = uuid.uuid4().hex
    environment = dict(env if env is not None else child_environment())
    environment[TAG_VARIABLE] = tag
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    # stderr goes into the same pipe as stdout, which one loop reads to the end, so a child
    # that writes much to stderr cannot stall on a full pipe that no thread reads.
    process = subprocess.Popen(
        list(command), cwd=cwd, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, text=True, encoding="utf-8", errors="replace",
    )
    logger.info("started %s (process group %d)", shlex.join(command), process.pid)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info(line)
        # Wait without reaping: while the child is an unreaped zombie its PID, and so its
        # process group id, cannot be reused, which makes the group cleanup below safe.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
        leftovers = _stop_processes(process.pid, tag, grace_period_s)
        if leftovers:
            logger.warning("stopped %d process(es) that %s left running: %s", len(leftovers), command[0],
                           ", ".join(leftovers))
    except BaseException:
        logger.warning("stopping %s and every process it started", shlex.join(command))
        with _further_signals_ignored():
            _stop_processes(process.pid, tag, grace_period_s)
        raise
    finally:
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    if process.returncode != 0:
        raise CommandFailed(command, process.returncode, tail, hint)


@contextmanager
def _further_signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for the duration, so that a second Ctrl-C cannot abandon cleanup half-way.

    Only the main thread may change signal handlers; elsewhere this does nothing. The
    exception already being handled carries the same intent, so nothing is lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _tagged_or_descendants(leader: int, tag: str) -> dict[int, psutil.Process]:
    """Processes (other than the leader itself) that descend from the leader or carry the tag."""
    found: dict[int, psutil.Process] = {}
    try:
        for child in psutil.Process(leader).children(recursive=True):
            found[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    me = os.getpid()
    for candidate in psutil.process_iter():
        if candidate.pid in (leader, me) or candidate.pid in found:
            continue
        try:
            if candidate.environ().get(TAG_VARIABLE) == tag:
                found[candidate.pid] = candidate
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _leader_running(leader: int) -> bool:
    """Return whether our child `leader` is still running, without reaping it."""
    try:
        return os.waitid(os.P_PID, leader, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None
    except ChildProcessError:
        return False


def _stop_processes(leader: int, tag: str, grace_period_s: float) -> list[str]:
    """SIGTERM the leader's group and every tagged or descendant process; SIGKILL what outlives the grace period.

    The leader is the caller's child and must not have been reaped yet; the caller reaps it.
    Returns a description of each process found besides the leader.
    """
    others = _tagged_or_descendants(leader, tag)
    described = []
    for process in others.values():
        try:
            described.append(f"{process.pid} ({process.name()})")
        except psutil.NoSuchProcess:
            continue
    _signal_group(leader, signal.SIGTERM)
    for process in others.values():
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    deadline = time.monotonic() + grace_period_s
    while time.monotonic() < deadline and (_leader_running(leader) or any(map(_alive, others.values()))):
        time.sleep(0.1)
    # A second look catches processes started during the grace period (a restarting worker).
    survivors = [p for p in {**others, **_tagged_or_descendants(leader, tag)}.values() if _alive(p)]
    _signal_group(leader, signal.SIGKILL)
    for process in survivors:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(survivors, timeout=5)
    return described
