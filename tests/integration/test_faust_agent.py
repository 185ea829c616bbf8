"""A minimal Faust app against the real broker: its agent reads topic A and writes topic B.

The app runs as a real ``faust worker`` subprocess (its own app id, topics and data dir), which is how the
pipeline runs too and keeps Faust's signal handling and event loop out of pytest's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

APP = textwrap.dedent('''
    import os

    import faust

    app = faust.App(
        os.environ["TEST_APP_ID"],
        broker="kafka://" + os.environ["TEST_BROKER"],
        web_enabled=False,
        store="memory://",
        topic_partitions=2,
    )
    source = app.topic(os.environ["TEST_SOURCE"], key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    sink = app.topic(os.environ["TEST_SINK"], key_type=bytes, value_type=bytes,
                     key_serializer="raw", value_serializer="raw")


    @app.agent(source)
    async def shout(stream):
        async for event in stream.events():
            await sink.send(key=event.key, value=event.value.upper())
''')


async def test_agent_reads_a_and_writes_b(stack, tmp_path: Path, topic_factory, producer, consume) -> None:
    source = await topic_factory(partitions=2, prefix="faust-in")
    sink = await topic_factory(partitions=2, prefix="faust-out")
    # Published before the worker starts: the agent reads from the earliest offset (a new group).
    sent = {f"lead-{i}".encode(): f"event {i}".encode() for i in range(10)}
    for key, value in sent.items():
        await producer.send(source, key=key, value=value)
    await producer.flush()

    (tmp_path / "echo_app.py").write_text(APP)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TEST_APP_ID": f"test-faust-{uuid.uuid4().hex[:8]}",
           "TEST_BROKER": stack.kafka_bootstrap, "TEST_SOURCE": source, "TEST_SINK": sink}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "faust", "-A", "echo_app", "worker", "-l", "info",
                                   "--without-web"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            records = await consume(sink, len(sent), timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworker exit code: {worker.poll()}; worker log:\n{log.read_text()}") from exc
        assert {r.key: r.value for r in records} == {k: v.upper() for k, v in sent.items()}
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
