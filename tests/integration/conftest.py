"""Worker fixtures: a real ``leadstream worker`` process on its own topics, app id and Redis database."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streams import demo
from streams.clients import redis_client
from streams.settings import Settings
from tests.conftest import redis_test_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def pipeline_settings(stack: Settings, kafka_admin: AIOKafkaAdminClient) -> AsyncIterator[Settings]:
    """Settings of an isolated pipeline: unique topics and app id, the tests' Redis database (empty
    at the start: no lead, view or model of another test). Its topics (and the worker's internal
    ones) are deleted afterwards, so runs do not pile them up."""
    tag = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(
        stack, app_id=f"leadstream-test-{tag}", redis_url=redis_test_url(stack.redis_url),
        topic_web=f"web-{tag}", topic_crm=f"crm-{tag}", topic_scores=f"scores-{tag}", topic_hot=f"hot-{tag}",
        topic_dead_letter=f"dlq-{tag}", topic_training=f"training-{tag}", partitions=4, web_port=_free_port(),
        api_port=_free_port(),
        session_timeout_s=6)
    client = redis_client(settings)
    await client.flushdb()
    await client.aclose()
    yield settings
    ours = [t for t in await kafka_admin.list_topics() if tag in t]
    if ours:
        await kafka_admin.delete_topics(ours)


def settings_env(settings: Settings) -> dict[str, str]:
    return dict(os.environ) | settings.to_env()


StartWorker = Callable[..., subprocess.Popen]


@pytest.fixture
def start_worker(pipeline_settings: Settings, tmp_path: Path) -> Iterator[StartWorker]:
    """``start_worker(**env_overrides)`` runs ``leadstream worker``; returns once it is ready."""
    procs: list[subprocess.Popen] = []

    def start(**overrides: str) -> subprocess.Popen:
        log = tmp_path / f"worker-{len(procs)}.log"
        proc = demo.start_worker(pipeline_settings, log, env=settings_env(pipeline_settings) | overrides)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        demo.stop_worker(proc)
