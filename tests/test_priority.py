"""The trainer's CPU priority (LEADSTREAM_TRAINER_NICE): its thread, its process and its session."""

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

from streams.priority import AUTOGROUP, autogroup_nice, lower_this_thread
from streams.settings import Settings
from streams.training import TrainingLoop

ROOT = Path(__file__).resolve().parent.parent


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_thread_lowers_itself_and_the_threads_it_starts_not_the_others():
    before = own_nice()

    def lowered():
        lower_this_thread(12)
        return own_nice(), in_thread(own_nice)

    assert in_thread(lowered) == (max(12, before), max(12, before))
    assert own_nice() == before  # the test's own thread is untouched


def test_a_thread_never_raises_its_priority():
    def twice():
        lower_this_thread(15)
        lower_this_thread(5)  # asks for more priority than it has: left at 15 (no error, no change)
        return own_nice()

    assert in_thread(twice) == max(15, own_nice())


def test_the_trainer_learns_in_a_thread_at_its_nice_value():
    settings = Settings.from_env({"LEADSTREAM_TRAINER_NICE": "17"})
    loop = TrainingLoop(None, settings, None, None)  # type: ignore[arg-type]
    try:
        assert asyncio.run(loop.in_trainer_thread(own_nice)) == max(17, own_nice())
    finally:
        loop.executor.shutdown()


def test_a_process_lowers_every_thread_it_has_and_the_ones_it_starts():
    code = """
import os, threading, time
from pathlib import Path
from streams.priority import lower_this_process
stop = threading.Event()
early = threading.Thread(target=stop.wait)  # started before: a native library's pool, say
early.start()
lower_this_process(9)
late = threading.Thread(target=stop.wait)
late.start()
print(sorted({os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in Path("/proc/self/task").iterdir()}))
stop.set()
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"[{max(9, own_nice())}]"


def autogroup_nice_of(code: str, *, new_session: bool) -> list[str]:
    """What a child process that runs ``code`` prints, then the nice value of its autogroup afterwards
    ("None" in the kernel's default autogroup: init's session, where a CI runner may start us)."""
    script = f"{code}\nfrom streams.priority import autogroup_nice\nprint(autogroup_nice())"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                          start_new_session=new_session)
    return done.stdout.split()


def test_a_session_leader_lowers_its_autogroup_and_another_process_leaves_its_session_alone():
    assert AUTOGROUP.exists(), "this test needs a Linux kernel with autogroups (CONFIG_SCHED_AUTOGROUP)"
    lower = "from streams.priority import lower_this_process\nprint(lower_this_process(11))"
    assert autogroup_nice_of(lower, new_session=True) == ["True", "11"]
    shared = str(autogroup_nice())  # the test run's own session: a child of it must not lower it
    assert autogroup_nice_of(lower, new_session=False) == ["False", shared]
    assert str(autogroup_nice()) == shared
