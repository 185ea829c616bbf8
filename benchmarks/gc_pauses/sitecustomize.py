"""Log the full garbage collections of a process started with this folder on ``PYTHONPATH``.

Python imports ``sitecustomize`` at start-up: with ``PYTHONPATH=benchmarks/gc_pauses`` and
``LEADSTREAM_GC_LOG_DIR`` set, each process writes ``gc-<pid>.txt`` there: its command line, then one
line per full (generation 2) collection: epoch seconds, pause in ms, objects the collector tracks
outside the frozen heap. ``benchmarks/bench_blocks.py --gc`` sets both for the workers it starts.
"""

import gc
import os
import sys
import time

_DIR = os.environ.get("LEADSTREAM_GC_LOG_DIR")  # counting the tracked objects after a pause costs a few ms more
if _DIR:
    _out = open(os.path.join(_DIR, f"gc-{os.getpid()}.txt"), "w", buffering=1)
    _out.write(" ".join(sys.argv) + "\n")
    _started: list[float] = [0.0]

    def _log(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - _started[0]) * 1000
        _out.write(f"{time.time():.3f} {pause_ms:.1f} {len(gc.get_objects())} frozen={gc.get_freeze_count()}\n")

    gc.callbacks.append(_log)
