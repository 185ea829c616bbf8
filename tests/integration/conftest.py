"""Worker fixtures: a real ``leadstream worker`` process on its own topics, app id and Redis database."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.settings import SETTINGS, Settings
from tests.conftest import redis_test_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pipeline_settings(stack: Settings) -> Settings:
    """Settings of an isolated pipeline: unique topics and app id, the tests' Redis database."""
    tag = uuid.uuid4().hex[:8]
    return dataclasses.replace(
        stack, app_id=f"leadstream-test-{tag}", redis_url=redis_test_url(stack.redis_url),
        topic_web=f"web-{tag}", topic_crm=f"crm-{tag}", topic_scores=f"scores-{tag}", topic_hot=f"hot-{tag}",
        topic_dead_letter=f"dlq-{tag}", topic_training=f"training-{tag}", partitions=4, web_port=_free_port(),
        session_timeout_s=6)


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for attr, s in SETTINGS.items():
        env[s.env] = str(getattr(settings, attr))
    return env


StartWorker = Callable[..., subprocess.Popen]


@pytest.fixture
def start_worker(pipeline_settings: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker()`` runs ``leadstream worker`` and returns once it is ready (log says Ready)."""
    procs: list[subprocess.Popen] = []

    def start(timeout: float = 90.0, **overrides: str) -> subprocess.Popen:
        log = tmp_path / f"worker-{len(procs)}.log"
        env = settings_env(pipeline_settings) | overrides
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--loglevel", "info"],
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while b"[^Worker]: Ready" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not get ready (exit {proc.poll()}):\n{log.read_text()[-5000:]}")
            time.sleep(0.2)
        proc.log_path = log  # type: ignore[attr-defined]
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
