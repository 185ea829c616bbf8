"""CPU priority: the trainer takes the CPU that scoring leaves (``LEADSTREAM_TRAINER_NICE``).

On Linux a nice value belongs to a thread, and threads inherit their creator's. With autogroups (on
by default in many distributions), the scheduler first shares the CPU between sessions, then between
the threads of each: a nice value alone ranks a thread only against its own session's. A process
that leads its own session (``leadstream demo`` and ``bench`` start their workers so; so does a
service manager) can lower that session as a whole, which lowers nobody else.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")


def lower_this_thread(nice: int) -> None:
    """The calling thread, and the threads it starts from now on, at ``nice`` (never raised: a
    thread already at a higher nice value keeps it; raising priority needs privileges)."""
    tid = threading.get_native_id()
    if os.getpriority(os.PRIO_PROCESS, tid) < nice:
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def lower_this_process(nice: int) -> bool:
    """Every thread of the process at ``nice`` (those started at import time too: a native library's
    pool), and the threads started later; and the session's autogroup when this process leads its
    session (else the session is someone else's: a shell's, whose other jobs must not slow down).
    Returns whether the autogroup was lowered."""
    lower_this_thread(nice)
    tasks = Path("/proc/self/task")
    for tid in (int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else ():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:  # ended meanwhile
            continue
    if os.getsid(0) != os.getpid() or autogroup_nice() is None:
        return False
    try:
        AUTOGROUP.write_text(str(nice))
    except OSError:  # a kernel without autogroups, or a read-only /proc: the thread's value is what counts
        return False
    return True


def autogroup_nice() -> int | None:
    """The nice value of this process's autogroup; None without one: a kernel without autogroups, or
    the kernel's default group (init's session, whose file reads empty and cannot be lowered)."""
    try:
        words = AUTOGROUP.read_text().split()  # "/autogroup-<id> nice <n>"
    except OSError:
        return None
    return int(words[-1]) if words else None
