"""Starting and stopping the processes of a run.

Every child gets its own session (Ctrl-C on the terminal reaches only the supervisor,
which then stops things in order), its output in `<state>/logs/<name>.log`, and — when
`setpriv` is there — a parent-death signal, so children of a supervisor that was
killed outright do not linger (`tulle down` still cleans up from the record).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from tulle.local.state import process_alive, process_start


HEADER_PREFIX = "--- "  # what starts the line written to a log before each (re)start


def command_line(cmd: Sequence[str], *, netns: str = "", uid: Optional[int] = None,
                 gid: Optional[int] = None, setpriv: Optional[str] = None) -> list[str]:
    """The argv that runs `cmd` inside network namespace `netns` (with its /etc/netns
    files bind-mounted by `ip netns exec`), as `uid`, with a parent-death signal."""
    argv: list[str] = []
    if netns:
        argv += ["ip", "netns", "exec", netns]
    if setpriv:
        argv += [setpriv]
        if uid is not None:
            argv += [f"--reuid={uid}"]
        if uid is not None or gid is not None:
            argv += [f"--regid={gid if gid is not None else uid}", "--clear-groups"]
        argv += ["--pdeathsig=TERM", "--"]
    elif (uid is not None and uid != os.getuid()) or (gid is not None and gid != os.getgid()):
        raise RuntimeError("running a process as another user or group needs setpriv (util-linux)")
    return argv + list(cmd)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    start: Optional[int]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> Optional[int]:
        """The exit code once the process has ended, else None (reaps it)."""
        return self.popen.poll()

    def describe_exit(self) -> str:
        code = self.popen.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"


def spawn(name: str, cmd: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Optional[str] = None,
          netns: str = "", uid: Optional[int] = None, gid: Optional[int] = None,
          pass_fds: Sequence[int] = ()) -> Child:
    log.parent.mkdir(parents=True, exist_ok=True)
    setpriv = shutil.which("setpriv")
    argv = command_line(cmd, netns=netns, uid=uid, gid=gid, setpriv=setpriv)
    with open(log, "ab") as out:
        out.write(f"{HEADER_PREFIX}{time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                 pass_fds=tuple(pass_fds))
    return Child(name, popen, process_start(popen.pid), log)


def terminate(pid: Optional[int], start: Optional[int] = None, *, grace: float = 5.0,
              popen: Optional[subprocess.Popen] = None) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds. Only the process recorded as
    (pid, start) is signalled, so a reused pid is never hit. True if it had to be killed."""
    if not pid or not process_alive(pid, start):
        if popen is not None:
            popen.poll()
        return False
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            return False
        if popen is None and not process_alive(pid, start):
            return False
        time.sleep(0.02)
    _signal(pid, signal.SIGKILL)
    if popen is not None:
        try:
            popen.wait(2)
        except subprocess.TimeoutExpired:
            pass
    else:
        deadline = time.monotonic() + 2
        while process_alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.02)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def log_tail(path: Path, lines: int = 5) -> str:
    """The last lines a process printed, without the `--- starting` lines of restarts
    (a crash-looping app's log may end with the header of its next run)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    printed = [line for line in text.strip().splitlines() if not line.startswith(HEADER_PREFIX)]
    return "\n".join(printed[-lines:])


async def terminate_async(child: Child, *, grace: float = 5.0) -> None:
    """`terminate` for the supervisor's event loop: never blocks it."""
    import asyncio

    if child.popen.poll() is not None:
        return
    _signal(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while child.popen.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if child.popen.poll() is None:
        _signal(child.pid, signal.SIGKILL)
        while child.popen.poll() is None:
            await asyncio.sleep(0.02)
