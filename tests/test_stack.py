"""streams.stack: generated configs, pid files, clear failures, and (integration) a real up/down cycle."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from streams import stack as stack_mod
from streams.settings import Settings
from streams.stack import Paths, StackError



def free_port(consecutive: int = 1) -> int:
    """A loopback port that is free, followed by ``consecutive - 1`` free ones (Kafka's controller is port + 1)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + consecutive > 65535:
            continue
        try:
            socks = [socket.create_server(("127.0.0.1", p)) for p in range(port, port + consecutive)]
        except OSError:
            continue
        for sock in socks:
            sock.close()
        return port
    raise RuntimeError("no free ports")


def local_settings(home: Path, kafka_port: int | None = None, redis_port: int | None = None) -> Settings:
    """Settings for a private stack under ``home`` on free ports (never the developer's running one)."""
    return dataclasses.replace(
        Settings.from_env({"LEADSTREAM_HOME": str(home)}),
        kafka_bootstrap=f"127.0.0.1:{kafka_port or free_port(2)}",
        redis_url=f"redis://127.0.0.1:{redis_port or free_port()}/0",
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return local_settings(tmp_path / "home")


# ---------------------------------------------------------------------------------------------- configs


def test_kafka_config_single_kraft_node(settings: Settings) -> None:
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    props = dict(line.split("=", 1) for line in stack_mod.kafka_config(settings).splitlines() if line)
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}"
    assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
    assert props["controller.quorum.voters"] == f"1@127.0.0.1:{port + 1}"
    assert props["log.dirs"] == str(settings.home / "kafka" / "data")
    assert props["num.partitions"] == "8"
    assert props["offsets.topic.replication.factor"] == props["transaction.state.log.replication.factor"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "true"


def test_redis_config_persists_and_binds_loopback(settings: Settings) -> None:
    port = settings.redis_url.rsplit(":", 1)[1].split("/")[0]
    conf = stack_mod.redis_config(settings).splitlines()
    assert "bind 127.0.0.1" in conf and f"port {port}" in conf
    assert "appendonly yes" in conf and "daemonize no" in conf and 'save ""' in conf  # AOF, no RDB forks
    assert f'dir "{settings.home / "redis" / "data"}"' in conf
    assert f'logfile "{settings.home / "logs" / "redis.log"}"' in conf


def test_kafka_version_comes_from_the_pom() -> None:
    assert stack_mod.kafka_version() == "4.1.1"


def test_jars_are_fetched_once(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no mvn: fetching would fail
    with pytest.raises(StackError, match=r"^kafka: Maven \(mvn\) is needed"):
        stack_mod.ensure_kafka_jars(settings)
    lib = settings.home / f"kafka-{stack_mod.kafka_version()}" / "lib"
    lib.mkdir(parents=True)
    (lib / ".complete").write_text(stack_mod.hashlib.sha256(stack_mod.POM.read_bytes()).hexdigest())
    assert stack_mod.ensure_kafka_jars(settings) == lib  # the marker matches the pom: no Maven run
    (lib / ".complete").write_text("an older pom")
    with pytest.raises(StackError, match="Maven"):
        stack_mod.ensure_kafka_jars(settings)


# ---------------------------------------------------------------------------------------------- pid files


@pytest.fixture
def sleeper(settings: Settings) -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in broker: its command line names the home's server.properties, as the real one's does."""
    props = str(settings.home / "kafka" / "server.properties")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "kafka.Kafka", props],
                            start_new_session=True)  # like up's services: out of pytest's process group
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while not cmdline.read_bytes() and time.monotonic() < deadline:  # empty for a moment after the start
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def test_pid_file_of_a_live_service(settings: Settings, sleeper: subprocess.Popen[bytes]) -> None:
    paths = Paths(settings.home)
    pid_file, mark = paths.pid("kafka"), stack_mod._mark("kafka", paths)
    pid_file.parent.mkdir(parents=True)
    assert stack_mod._live_pid(pid_file, mark) is None  # no file
    pid_file.write_text("not a pid")
    assert stack_mod._live_pid(pid_file, mark) is None
    pid_file.write_text(f"{sleeper.pid}\n")
    assert sleeper.poll() is None, f"the stand-in process died (exit {sleeper.returncode}), not stack's fault"
    assert stack_mod._live_pid(pid_file, mark) == sleeper.pid
    # Alive, but not what up started (a recycled pid): another home's broker, or not a redis-server.
    assert stack_mod._live_pid(pid_file, stack_mod._mark("kafka", Paths(settings.home / "other"))) is None
    assert stack_mod._live_pid(pid_file, stack_mod._mark("redis", paths)) is None


def test_down_stops_by_pid_file(settings: Settings, sleeper: subprocess.Popen[bytes],
                                capsys: pytest.CaptureFixture[str]) -> None:
    paths = Paths(settings.home)
    paths.run.mkdir(parents=True)
    paths.pid("kafka").write_text(f"{sleeper.pid}\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    paths.pid("redis").write_text(f"{dead.pid}\n")

    stack_mod.down(settings)

    sleeper.wait(5)  # it was stopped (down already reaped its child, so no exit code is known here)
    assert not paths.pid("kafka").exists() and not paths.pid("redis").exists()
    assert capsys.readouterr().out.splitlines() == ["kafka: stopped", "redis: not running (removed a stale pid file)"]


def test_down_without_pid_files_touches_nothing(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    stack_mod.down(settings)
    assert capsys.readouterr().out.splitlines() == ["kafka: not running", "redis: not running"]


# ---------------------------------------------------------------------------------------------- failures


def test_redis_port_taken_names_redis_and_its_log(settings: Settings) -> None:
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_server(("127.0.0.1", port)):  # listens, never answers PING
        with pytest.raises(StackError) as err:
            stack_mod.up(settings, environ={}, services=["redis"])
    log = settings.home / "logs" / "redis.log"
    assert str(err.value).startswith(f"redis: did not start (exited during startup); see its log {log}")
    assert "Address already in use" in str(err.value)  # the log's tail is in the message
    assert not Paths(settings.home).pid("redis").exists()


def test_no_java_names_kafka(settings: Settings) -> None:
    # LEADSTREAM_JAVA_HOME, or JAVA_HOME, names a directory without Java
    settings = dataclasses.replace(settings, java_home=settings.home / "no-such-jdk")
    with pytest.raises(StackError, match=r"^kafka: Java 17\+ is needed .* not found in .*no-such-jdk/bin"):
        stack_mod.up(settings, environ={}, services=["kafka"])


def test_kafka_failing_to_format_names_kafka_and_its_log(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    settings = dataclasses.replace(settings, java_home=None)  # `java` on the PATH
    monkeypatch.setattr(stack_mod, "ensure_kafka_jars", lambda s: tmp_path)  # no jars: java finds no class
    with pytest.raises(StackError) as err:
        stack_mod.up(settings, environ={}, services=["kafka"])
    assert str(err.value).startswith(f"kafka: formatting its storage failed (exit 1); see {settings.home}/logs/kafka.log")
    assert "kafka.tools.StorageTool" in str(err.value)


def test_kafka_exiting_at_start_names_kafka_and_its_log(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    settings = dataclasses.replace(settings, java_home=None)  # `java` on the PATH
    monkeypatch.setattr(stack_mod, "ensure_kafka_jars", lambda s: tmp_path)
    data = settings.home / "kafka" / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("")  # looks formatted: up goes straight to starting the broker
    with pytest.raises(StackError) as err:
        stack_mod.up(settings, environ={}, services=["kafka"])
    assert str(err.value).startswith(
        f"kafka: did not start (exited during startup); see its log {settings.home}/logs/kafka.log")
    assert "kafka.Kafka" in str(err.value)
    assert not Paths(settings.home).pid("kafka").exists()


def test_a_server_set_by_the_user_must_answer(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stack_mod, "EXTERNAL_TIMEOUT_S", 0.5)
    with pytest.raises(StackError, match=r"^redis: nothing answers at redis://127\.0\.0\.1:\d+/0 \(set by the user"):
        stack_mod.up(settings, environ={"LEADSTREAM_REDIS": settings.redis_url}, services=["redis"])
    assert not (settings.home / "run").exists()  # nothing was started


# ---------------------------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_up_is_idempotent(stack: Settings) -> None:
    # The session's stack already runs (the fixture called up): up again starts nothing and both answer.
    for _ in range(2):
        assert stack_mod.up(stack).started == []
    assert stack_mod._kafka_answers(stack)
    assert redis.Redis.from_url(stack.redis_url).ping()


@pytest.mark.integration
async def test_up_down_twice_keeps_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        stack: Settings) -> None:
    # A private stack (own home, own ports) so the session's stack is untouched; the jars are shared.
    lib = stack_mod.ensure_kafka_jars(stack)
    monkeypatch.setattr(stack_mod, "ensure_kafka_jars", lambda s: lib)
    own = local_settings(tmp_path / "home")
    try:
        assert stack_mod.up(own, environ={}).started == ["kafka", "redis"]
        async with AIOKafkaProducer(bootstrap_servers=own.kafka_bootstrap) as producer:
            await producer.send_and_wait("kept", b"message")
        redis.Redis.from_url(own.redis_url).set("kept", "value")
        stack_mod.down(own)
        assert not any((own.home / "run").iterdir())

        assert stack_mod.up(own, environ={}).started == ["kafka", "redis"]
        assert stack_mod.up(own, environ={}).started == []
        assert redis.Redis.from_url(own.redis_url).get("kept") == b"value"  # AOF
        consumer = AIOKafkaConsumer("kept", bootstrap_servers=own.kafka_bootstrap, auto_offset_reset="earliest")
        async with consumer:
            assert (await consumer.getone()).value == b"message"  # the log dir
    finally:
        stack_mod.down(own)


def test_a_redis_still_loading_its_data_set_gets_more_time(monkeypatch) -> None:
    """Redis refuses commands (LOADING) until it has read its data back: that is no failed start."""
    stack = stack_mod
    monkeypatch.setattr(stack, "START_TIMEOUT_S", {"kafka": 0.2, "redis": 0.2})
    monkeypatch.setattr(stack, "_alive", lambda pid: True)
    answers = iter([False] * 8 + [True])
    settings = Settings.from_env({})
    monkeypatch.setattr(stack, "_redis_loading", lambda s: True)
    assert stack._wait_started("redis", settings, lambda: next(answers), pid=1)
    monkeypatch.setattr(stack, "_redis_loading", lambda s: False)  # not loading: the start failed
    assert not stack._wait_started("redis", settings, lambda: False, pid=1)
    assert not stack._wait_started("kafka", settings, lambda: False, pid=1)  # Kafka has no loading state
