"""Every verl process that ladder starts stops when ladder's launcher is gone, however it went.

Loaded by name in each process that imports verl (torchrun's ranks, GRPO's driver): stages/supervise.py adds
`plugins.lifeline` to VERL_USE_EXTERNAL_MODULES and its own pid as LADDER_LAUNCHER_PID. torchrun starts each rank
in a session of its own, so a SIGKILL to `./train.sh`'s process group never reaches a rank, which would go on
training unattended. Here a daemon thread looks at the launcher once a second; once it is gone (no such process,
a zombie, or another process under its pid: the start time differs) this process gets SIGTERM and, 10 s later,
SIGKILL. torchrun then exits as its ranks do; Ray's local cluster shares its driver's fate (Ray's own prctl).
Without LADDER_LAUNCHER_PID (a verl process ladder did not start) importing this does nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

GRACE_S = 10


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when it is gone or a
    zombie. Without /proc (not Linux): "" while the kernel knows the pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
            return ""
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""


def watch(pid: int, started: str | None, interval_s: float = 1.0) -> None:
    while True:
        now = start_time(pid)
        if now is None or (started and now and now != started):
            break
        time.sleep(interval_s)
    print(f"[ladder] the launcher (pid {pid}) is gone: stopping this verl process (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


_pid = os.environ.get("LADDER_LAUNCHER_PID", "")
if _pid.isdigit() and not any(t.name == "ladder-lifeline" for t in threading.enumerate()):
    threading.Thread(target=watch, args=(int(_pid), os.environ.get("LADDER_LAUNCHER_START")),
                     name="ladder-lifeline", daemon=True).start()
