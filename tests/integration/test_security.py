"""Secured connections end to end: a broker with only a SASL_SSL listener (SCRAM users, a CA made in
the test) and a Redis with ``requirepass``; the worker scores through them, and wrong credentials stop
it at start with one line naming the setting."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams import demo
from streams.clients import kafka_kwargs, redis_client
from streams.settings import Secret, Settings
from streams.state import LeadStore
from tests.integration.ownstack import RedisServer, free_port, make_tls, start_broker

pytestmark = pytest.mark.integration
T0 = 1_767_225_600_000
USER, PASSWORD, REDIS_PASSWORD = "scorer", "scram-pw-9f2c", "redis-pw-71ab"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """(settings for the secured broker and Redis, the CA file); both stopped after the module."""
    d = tmp_path_factory.mktemp("secured")
    tls = make_tls(d / "tls")
    broker = start_broker(d / "kafka", tls=tls, users={USER: PASSWORD})
    server = RedisServer(d / "redis", password=REDIS_PASSWORD).start()
    tag = uuid.uuid4().hex[:8]
    secret_file = d / "kafka-password"
    secret_file.write_text(PASSWORD + "\n")
    env = {"LEADSTREAM_KAFKA": broker.bootstrap, "LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "LEADSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "LEADSTREAM_KAFKA_SASL_USERNAME": USER,
           "LEADSTREAM_KAFKA_SASL_PASSWORD_FILE": str(secret_file), "LEADSTREAM_KAFKA_SSL_CAFILE": str(tls.ca_pem),
           "LEADSTREAM_REDIS": server.url, "LEADSTREAM_REDIS_PASSWORD": REDIS_PASSWORD,
           "LEADSTREAM_APP_ID": f"secure-{tag}", "LEADSTREAM_PARTITIONS": "2", "LEADSTREAM_WEB_PORT": str(free_port()),
           "LEADSTREAM_SESSION_TIMEOUT_SECONDS": "6", "LEADSTREAM_HOME": str(d / "home")}
    try:
        yield Settings.from_env(env), d
    finally:
        broker.stop()
        server.kill()


def run_worker_expecting_failure(settings: Settings, log: Path, **overrides: str) -> tuple[int, str, float]:
    env = dict(os.environ) | settings.to_env() | overrides
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=90)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stderr, time.monotonic() - start


async def test_worker_scores_through_sasl_ssl_and_a_redis_password(secured, tmp_path):
    settings, _ = secured
    worker = demo.start_worker(settings, tmp_path / "worker.log", env=settings.to_env())
    try:
        producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all")
        await producer.start()
        try:
            for i in range(20):
                doc = {"event_id": f"sec-{i}", "lead_id": f"lead-{i % 4}", "type": "click", "ts": T0 + i, "props": {}}
                await producer.send_and_wait(settings.topic_web, key=doc["lead_id"].encode(), value=orjson.dumps(doc))
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(settings.topic_scores, **kafka_kwargs(settings), group_id=None,
                                    auto_offset_reset="earliest")
        await consumer.start()
        scored: set[str] = set()
        try:
            deadline = time.monotonic() + 60
            while len(scored) < 20 and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=1000)).values():
                    scored |= {orjson.loads(r.value)["event_id"] for r in batch
                               if orjson.loads(r.value)["trigger"] == "event"}  # not the decay rescoring
        finally:
            await consumer.stop()
        assert scored == {f"sec-{i}" for i in range(20)}
        client = redis_client(settings)
        try:
            store = LeadStore(client, settings.tombstone_ttl_s)
            assert [(await store.get(f"lead-{n}"))["state"]["counts"] for n in range(4)] == [{"click": 5}] * 4
        finally:
            await client.aclose()
        log = (tmp_path / "worker.log").read_text()
        assert PASSWORD not in log and REDIS_PASSWORD not in log  # secrets never logged
    finally:
        demo.stop_worker(worker)


@pytest.mark.parametrize("overrides,names", [
    ({"LEADSTREAM_KAFKA_SASL_PASSWORD_FILE": "", "LEADSTREAM_KAFKA_SASL_PASSWORD": "not-the-password"},
     ["refused the SASL login of user 'scorer'", "LEADSTREAM_KAFKA_SASL_PASSWORD"]),
    ({"LEADSTREAM_KAFKA_SASL_USERNAME": "mallory"},
     ["refused the SASL login of user 'mallory'", "LEADSTREAM_KAFKA_SASL_USERNAME"]),
    ({"LEADSTREAM_KAFKA_SSL_CAFILE": "-"}, ["TLS certificate is not trusted", "LEADSTREAM_KAFKA_SSL_CAFILE"]),
    ({"LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, ["LEADSTREAM_KAFKA_SECURITY_PROTOCOL=PLAINTEXT"]),
    ({"LEADSTREAM_REDIS_PASSWORD": "wrong-redis-pw"}, ["Redis at", "refused the login", "LEADSTREAM_REDIS_PASSWORD"]),
    ({"LEADSTREAM_REDIS_PASSWORD": ""}, ["Redis at", "LEADSTREAM_REDIS_PASSWORD"]),
], ids=["kafka-password", "kafka-user", "kafka-ca", "kafka-protocol", "redis-password", "redis-no-password"])
def test_wrong_credentials_stop_the_worker_with_one_line_naming_the_setting(secured, tmp_path, overrides, names):
    settings, _ = secured
    code, err, took = run_worker_expecting_failure(settings, tmp_path / "worker.log", **overrides)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("leadstream worker: "), err
    assert all(n in lines[-1] for n in names), lines[-1]
    assert "Traceback" not in err and took < 45  # not aiokafka's endless retry, not a traceback wall
    assert PASSWORD not in err and REDIS_PASSWORD not in err and "not-the-password" not in err


def test_secrets_are_masked_in_settings_and_repr(secured):
    settings, _ = secured
    shown = subprocess.run([sys.executable, "-m", "streams.cli", "settings"], env=dict(os.environ) | settings.to_env(),
                           capture_output=True, text=True, check=True).stdout
    assert PASSWORD not in shown and REDIS_PASSWORD not in shown and "now ***" in shown
    assert PASSWORD not in repr(settings) and REDIS_PASSWORD not in repr(settings)
    assert dataclasses.replace(settings, redis_password=Secret("x")).redis_password.reveal() == "x"
