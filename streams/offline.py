"""The file side of the offline tools (:mod:`models.offline` is pure): history exports read row by row,
the sorted runs of a long export spilled to temporary files, and ``leadstream evaluate``, which reads
its inputs here and prints its report.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import pickle
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from tqdm import tqdm

from models.offline.evaluate import REFIT_LAG, batch_gc, evaluate_events, format_table
from models.offline.history import (BAD_LINE, RUN_ROWS, Mapping, MappingError, RowResult, check_columns,
                                    load_mapping, rows_to_events)
from models.rules import ConfigError, load_rules

T = TypeVar("T")

# ---------------------------------------------------------------- history files


def read_rows(path: str | Path, delimiter: str = ",") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, row)`` pairs of a ``.csv`` (header line first) or ``.jsonl`` / ``.ndjson`` file.

    Read lazily, one row at a time (memory does not grow with the file). ``delimiter`` separates
    CSV values (``";"`` for European CRM exports; ``"\\t"`` or ``"tab"`` for a tab). A line that
    cannot be read as a row comes out as ``{BAD_LINE: reason}``, so that
    :func:`~models.offline.history.rows_to_events` reports it instead of it being skipped. Blank lines
    are not rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson", ".tsv"):
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected .csv, .tsv, .jsonl or .ndjson")
    delimiter = "\t" if suffix == ".tsv" or delimiter in ("tab", "\\t") else delimiter
    if len(delimiter) != 1:
        raise ValueError(f"delimiter {delimiter!r}: expected one character, such as ',' or ';' (or 'tab')")
    with path.open(newline="" if suffix in (".csv", ".tsv") else None, encoding="utf-8-sig") as f:
        if suffix in (".csv", ".tsv"):
            yield from _csv_rows(csv.reader(f, delimiter=delimiter), path)
            return
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                yield line, {BAD_LINE: f"invalid JSON: {exc}"}
                continue
            if not isinstance(doc, dict):
                doc = {BAD_LINE: f"expected a JSON object, got {type(doc).__name__}"}
            yield line, doc


PEEK_ROWS = 1000  # rows looked at before streaming, to check the mapping's columns


def stream_history(path: str | Path, mapping: Mapping, delimiter: str = ",",
                   run_rows: int = RUN_ROWS) -> tuple[Iterator[RowResult], list[str]]:
    """A history file as lazily converted rows, and warnings: the file side of import and evaluate.

    The mapping's columns are checked on the first :data:`PEEK_ROWS` rows (for a CSV file: its
    header) before anything is converted. Memory stays bounded whatever the file's length (long
    exports are sorted in runs spilled to temporary files, see :func:`~models.offline.history.rows_to_events`).

    Raises
    ------
    MappingError
        The mapping names columns the file does not have.
    OSError, ValueError
        The file cannot be read (unknown type, bad delimiter, duplicate header names).
    """
    rows = read_rows(path, delimiter)
    head = list(itertools.islice(rows, PEEK_ROWS))
    warnings = check_columns({c for _, row in head if BAD_LINE not in row for c in row}, mapping, str(path)) \
        if head else []
    return rows_to_events(itertools.chain(head, rows), mapping, spill=spill_run, run_rows=run_rows), warnings


def _csv_rows(reader: Any, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    header = next(reader, None)
    if header is None:
        return
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate column names in the header: {dupes}")
    for cells in reader:
        if not cells:
            continue
        if len(cells) != len(header):
            yield reader.line_num, {BAD_LINE: f"{len(cells)} values but the header has {len(header)} columns"}
        else:
            yield reader.line_num, dict(zip(header, cells))


def spill_run(run: list[T]) -> Iterator[T]:
    """Write a sorted run of parsed rows to an anonymous temporary file; read it back lazily.

    The file side of :func:`~models.offline.history.rows_to_events`' external sort.
    """
    f = tempfile.TemporaryFile()
    for p in run:
        pickle.dump(p, f, protocol=pickle.HIGHEST_PROTOCOL)
    count = len(run)
    run.clear()

    def back() -> Iterator[T]:
        with f:
            f.seek(0)
            for _ in range(count):
                yield pickle.load(f)

    return back()


# ---------------------------------------------------------------- leadstream evaluate


def _shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it (the settings give it absolute)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_evaluate(file: str | Path, mapping: str | Path, scoring_config_path: str | Path, as_json: bool = False,
                 min_outcomes: int = 50, model_kind: str = "tournament", batch_every: int = 1000,
                 delimiter: str = ",", refit_lag: int = REFIT_LAG, processes: int | None = None) -> int:
    """``leadstream evaluate FILE --mapping MAPPING [--json]``.

    Reads the history with :mod:`models.offline.history`, lists every bad row with its line on stderr,
    replays the good ones with :func:`evaluate_events` and prints a table, or with ``as_json``
    exactly one JSON object, on stdout. Exit code 0; 2 when the mapping, the scoring config or the
    file cannot be used at all. ``processes``: see :func:`evaluate_events` (default: 2 when this
    process may use 2 CPUs or more, else 1; the figures are the same).
    """
    started = time.perf_counter()
    try:
        rules = load_rules(Path(scoring_config_path).read_text(encoding="utf-8"))
        try:
            parsed = load_mapping(Path(mapping).read_text(encoding="utf-8"))
        except MappingError as exc:
            raise MappingError(f"{mapping}: {exc}") from None
        try:
            results, warnings = stream_history(file, parsed, delimiter)
        except MappingError as exc:
            raise MappingError(f"mapping {mapping}: {exc}") from None
    except (ConfigError, MappingError, OSError, ValueError) as exc:
        print(f"leadstream evaluate: {exc}", file=sys.stderr)
        return 2
    rules = dataclasses.replace(rules, fields=rules.fields.with_private(parsed.private_fields))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = {"read": 0, "bad": 0}
    bad: list[str] = []  # printed once the replay is done (it may run in a child process)

    def events() -> Iterator[dict[str, Any]]:
        for r in tqdm(results, desc="evaluate", unit=" rows", disable=None, file=sys.stderr):
            rows["read"] += 1
            if r.error:
                rows["bad"] += 1
                bad.append(f"{file}:{r.line}: bad row{f' (lead {r.lead_id})' if r.lead_id else ''}: {r.error}")
            yield from r.events

    if processes is None:
        processes = 2 if _cpus() >= 2 else 1
    returned = {"rows": rows, "bad": bad}
    thresholds = batch_gc()  # here the trainer's process (and the child processes forked from it)
    try:
        evaluation = evaluate_events(events(), rules, min_outcomes=min_outcomes, model_kind=model_kind,
                                     batch_every=batch_every, refit_lag=refit_lag, processes=processes,
                                     returned=returned)
    finally:
        import gc

        gc.set_threshold(*thresholds)
        gc.unfreeze()
    rows, bad = returned["rows"], returned["bad"]
    for line in bad:
        print(line, file=sys.stderr)
    if rows["bad"]:
        print(f"{rows['bad']} of {rows['read']} rows are bad and left out of the evaluation", file=sys.stderr)
    for reason, count in sorted(evaluation.rejected.items()):
        print(f"{count} events rejected: {reason}", file=sys.stderr)
    report = {"file": str(file), "mapping": str(mapping), "scoring_config": _shown(scoring_config_path),
              "rows": rows, **evaluation.report(),
              "elapsed_s": round(time.perf_counter() - started, 2)}
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_table(report))
    return 0
