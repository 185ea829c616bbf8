"""Importing a source tree's ``models`` and ``streams`` apart from another's, for the A/B benchmarks
(``bench_step_ab.py``, ``bench_batch_ab.py``): both trees run in one process, in the same minutes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def import_tree(tree: str, names: tuple[str, ...], fallbacks: dict[str, str] | None = None) -> dict[str, ModuleType]:
    """``names`` imported afresh from ``tree`` (the modules of a tree imported before stay alive in
    what holds them); ``fallbacks``: a module's older name, tried when a tree predates its move."""
    for name in [m for m in sys.modules if m in ("models", "streams") or m.startswith(("models.", "streams."))]:
        del sys.modules[name]
    root = str(Path(tree).resolve())
    sys.path.insert(0, root)
    try:
        mods = {}
        for name in names:
            try:
                mods[name] = importlib.import_module(name)
            except ModuleNotFoundError:
                if name not in (fallbacks or {}):
                    raise
                mods[name] = importlib.import_module(fallbacks[name])
    finally:
        sys.path.remove(root)
    first = mods[names[0]]
    assert first.__file__.startswith(root), first.__file__
    return mods
