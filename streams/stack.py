"""The local stack behind ``leadstream up`` / ``leadstream down``: a single-node Kafka (KRaft) and a Redis.

No Docker needed: Kafka's jars come from Maven Central through ``deploy/kafka/pom.xml`` (Java 17+ and mvn
required) and Redis is the ``redis-server`` binary on PATH. Everything lives under ``settings.home``:

    kafka-<version>/lib/   jars (fetched once)      kafka/   server.properties, log4j2 config, data/
    redis/                 redis.conf, data/        logs/    kafka.log, redis.log
    run/                   kafka.pid, redis.pid     (only what ``up`` started; ``down`` stops only those)

A service whose ``LEADSTREAM_*`` variable is set is never started; ``up`` only checks that it answers.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from streams.clients import kafka_kwargs, redis_sync_client
from streams.settings import Settings, redact_url

POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
SERVICES = ("kafka", "redis")
START_TIMEOUT_S = {"kafka": 90.0, "redis": 20.0}  # Kafka's first start formats storage and warms a JVM
LOADING_TIMEOUT_S = 1800.0  # Redis reloading a big data set (a million leads: 3.5 GB of AOF, about a minute)
EXTERNAL_TIMEOUT_S = 15.0  # a server the user pointed at may be restarting; give it a moment
STOP_TIMEOUT_S = 30.0
KAFKA_HEAP = ["-Xms256m", "-Xmx512m"]


class StackError(RuntimeError):
    """A service of the local stack could not be prepared, started or reached; the message says which and why."""


@dataclass
class UpResult:
    """What one ``up`` call did, so a caller (the test session) stops only what it started."""

    started: list[str] = field(default_factory=list)


class Paths:
    """Where the stack keeps its files under ``settings.home``."""

    def __init__(self, home: Path) -> None:
        self.home, self.run, self.logs = home, home / "run", home / "logs"
        self.kafka, self.redis = home / "kafka", home / "redis"

    def pid(self, service: str) -> Path:
        return self.run / f"{service}.pid"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"


# ---------------------------------------------------------------------------------------------- public API


def up(settings: Settings, environ: Mapping[str, str] | None = None,
       services: Sequence[str] = SERVICES) -> UpResult:
    """Start whatever of Kafka and Redis is not running yet, and wait until both answer.

    Idempotent: a service whose pid file names a live process that answers is left alone.
    Raises :class:`StackError` naming the service and its log when one does not come up.
    """
    result = UpResult()
    for service in services:
        kafka = service == "kafka"
        attr, address = (("kafka_bootstrap", settings.kafka_bootstrap) if kafka
                         else ("redis_url", redact_url(settings.redis_url)))
        answers = functools.partial(_kafka_answers if kafka else _redis_answers, settings)
        if Settings.is_set(attr, environ):
            # The user points at their own server: start nothing, just make sure it is there.
            if not _wait(answers, EXTERNAL_TIMEOUT_S):
                raise StackError(f"{service}: nothing answers at {address} (set by the user, so leadstream starts "
                                 f"no {service}). Start it, or unset the variable to let `leadstream up` do it.")
            _say(f"{service}: using {address}")
        elif _ensure(service, settings, address, answers, _kafka_command if kafka else _redis_command):
            result.started.append(service)
    return result


def running_pid(settings: Settings, service: str) -> int | None:
    """The pid of ``service`` (kafka, redis) if ``up`` started it and it still runs, else None."""
    paths = Paths(settings.home)
    return _live_pid(paths.pid(service), _mark(service, paths))


def down(settings: Settings, services: Sequence[str] = SERVICES) -> None:
    """Stop what ``up`` started, by its pid files (SIGTERM, then SIGKILL after a timeout)."""
    paths = Paths(settings.home)
    for service in services:
        pid_file = paths.pid(service)
        pid = running_pid(settings, service)
        if pid is None:
            stale = pid_file.exists()
            pid_file.unlink(missing_ok=True)
            _say(f"{service}: not running" + (" (removed a stale pid file)" if stale else ""))
            continue
        _terminate(pid)
        pid_file.unlink(missing_ok=True)
        _say(f"{service}: stopped")


def kafka_version(pom: Path = POM) -> str:
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if not match:
        raise StackError(f"kafka: no <kafka.version> in {pom}")
    return match.group(1).strip()


def ensure_kafka_jars(settings: Settings) -> Path:
    """The directory with every jar the broker needs, fetched once with Maven into ``<home>/kafka-<version>/lib``."""
    version = kafka_version()
    lib = settings.home / f"kafka-{version}" / "lib"
    marker = lib / ".complete"
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()
    # The marker holds the pom's hash: an edited pom (another dependency) fetches again.
    if marker.is_file() and marker.read_text().strip() == digest:
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("kafka: Maven (mvn) is needed once to fetch the Kafka jars; install it "
                         "(e.g. apt-get install maven) or set LEADSTREAM_KAFKA to an existing broker")
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir(parents=True)
    _say(f"kafka: fetching Kafka {version} jars with Maven into {lib} (once)")
    cmd = [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={lib}"]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0 or not any(lib.glob("kafka_*.jar")):
        raise StackError(f"kafka: fetching the jars failed ({' '.join(cmd)} exited {proc.returncode}):\n"
                         f"{_tail(proc.stdout + proc.stderr)}")
    marker.write_text(digest + "\n")
    return lib


# ---------------------------------------------------------------------------------------------- Kafka


def _first_hostport(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return host.strip("[]"), int(port)


def kafka_config(settings: Settings) -> str:
    """server.properties of the single combined broker+controller; the controller listens on the next port."""
    host, port = _first_hostport(settings.kafka_bootstrap)
    cport = port + 1
    data = Paths(settings.home).kafka / "data"
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{host}:{cport}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=8",
        # One node: every internal topic has one replica. Fewer offsets partitions = a faster first group join.
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=8",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "",
    ])


# Console only (up's Popen sends it to logs/kafka.log); WARN keeps the file small, but the line that says the
# broker started stays.
LOG4J2 = """\
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = INFO
"""


def _java(home: Path | None) -> str:
    java = str(home / "bin" / "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise StackError("kafka: Java 17+ is needed to run the broker and `java` was not found "
                         f"{f'in {home}/bin ' if home else 'on the PATH '}"
                         "(install e.g. openjdk-17-jre-headless, or set LEADSTREAM_JAVA_HOME / JAVA_HOME)")
    return java


def _cluster_id() -> str:
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding, never starting with '-'.
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def _kafka_command(settings: Settings, paths: Paths, log_offset: int) -> list[str]:
    """Write the broker's config, format its storage on the first start, and return the command that runs it."""
    java = _java(settings.java_home)
    lib = ensure_kafka_jars(settings)
    (paths.kafka / "data").mkdir(parents=True, exist_ok=True)
    props, log4j = paths.kafka / "server.properties", paths.kafka / "log4j2.properties"
    props.write_text(kafka_config(settings))
    log4j.write_text(LOG4J2)
    # -XX:+ExitOnOutOfMemoryError: a broken broker exits (and up/down notice) rather than hanging.
    base = [java, *KAFKA_HEAP, "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{lib}/*"]
    if not (paths.kafka / "data" / "meta.properties").exists():
        # First start: a KRaft log dir must be formatted with a cluster id before the broker runs.
        log = paths.log("kafka")
        with log.open("ab") as out:
            rc = subprocess.run([*base, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(props)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise StackError(f"kafka: formatting its storage failed (exit {rc}); see {log}:\n"
                             f"{_tail_file(log, log_offset)}")
    return [*base, "kafka.Kafka", str(props)]


def _kafka_answers(settings: Settings) -> bool:
    """A real metadata round trip: the broker is up and knows itself (not just a listening socket)."""

    async def probe() -> bool:
        from aiokafka import AIOKafkaClient

        client = AIOKafkaClient(**kafka_kwargs(settings), request_timeout_ms=5000)
        try:
            await asyncio.wait_for(client.bootstrap(), 6.0)
            return bool(client.cluster.brokers())
        except Exception:
            return False
        finally:
            await client.close()

    with _quiet("aiokafka"):
        return _run(probe())


# ---------------------------------------------------------------------------------------------- Redis


def _redis_hostport(settings: Settings) -> tuple[str, int]:
    url = urlparse(settings.redis_url)
    return url.hostname or "127.0.0.1", url.port or 6379


def redis_config(settings: Settings) -> str:
    host, port = _redis_hostport(settings)
    paths = Paths(settings.home)
    return "\n".join([
        f"bind {host}",
        f"port {port}",
        "daemonize no",  # up starts it detached itself and writes the pid file
        "appendonly yes",  # state survives restarts (every write, fsync once a second)
        # No RDB snapshots on top (Redis's default: after 10,000 changes in a minute): the AOF is the
        # durability, and each snapshot forks a child that writes the whole dataset again, on the cores
        # the worker runs on, in the middle of a burst (seen in `leadstream bench`: redis_forks).
        'save ""',
        f'dir "{paths.redis / "data"}"',
        f'logfile "{paths.log("redis")}"',
        "loglevel notice",
        *_redis_auth(settings),
        "",
    ])


def _redis_auth(settings: Settings) -> list[str]:
    """A configured password becomes the local server's ``requirepass`` (an ACL user needs a real server)."""
    url = urlparse(settings.redis_url)
    password = url.password or settings.redis_password.reveal()
    if not password or url.username not in (None, "", "default"):
        return []
    return ['requirepass "' + password.replace("\\", "\\\\").replace('"', '\\"') + '"']


def _redis_command(settings: Settings, paths: Paths, log_offset: int) -> list[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise StackError("redis: `redis-server` was not found on PATH (install it, e.g. apt-get install "
                         "redis-server) or set LEADSTREAM_REDIS to an existing server")
    (paths.redis / "data").mkdir(parents=True, exist_ok=True)
    conf = paths.redis / "redis.conf"
    conf.touch(mode=0o600)  # it may hold requirepass
    conf.chmod(0o600)
    conf.write_text(redis_config(settings))
    return [server, str(conf)]


def _wait_started(service: str, settings: Settings, answers: Callable[[], bool], pid: int) -> bool:
    """Whether ``service`` answers within its start time; a Redis still loading its data set gets
    up to :data:`LOADING_TIMEOUT_S` more (it refuses commands until it has loaded, not a failure)."""
    if _wait(answers, START_TIMEOUT_S[service], lambda: _alive(pid)):
        return True
    if service != "redis" or not _redis_loading(settings):
        return False
    _say(f"redis: still loading its data set; waiting up to {LOADING_TIMEOUT_S:.0f} s")
    return _wait(answers, LOADING_TIMEOUT_S, lambda: _alive(pid))


def _redis_loading(settings: Settings) -> bool:
    return _redis_state(settings) == "loading"


def _redis_answers(settings: Settings) -> bool:
    return _redis_state(settings) == "up"


def _redis_state(settings: Settings) -> str:
    """``up``, ``loading`` (it refuses commands until its data set is loaded) or ``down``."""
    client = redis_sync_client(settings, socket_timeout=2, socket_connect_timeout=2)
    try:
        return "up" if client.ping() else "down"
    except redis.exceptions.BusyLoadingError:
        return "loading"
    except (redis.RedisError, OSError):
        return "down"
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- processes


def _mark(service: str, paths: Paths) -> str:
    """Text in the command line of the process up started (guards against a recycled pid in a stale pid file).

    The broker's names this home's config; redis-server rewrites its title, so only its name is left there.
    """
    return str(paths.kafka / "server.properties") if service == "kafka" else "redis-server"


def _live_pid(pid_file: Path, mark: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive and its command line has ``mark``, else None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    if not Path("/proc/self").exists():  # not Linux: trust the pid file
        return pid
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # Empty for a moment while a process starts; otherwise it must be the process up started.
    return pid if not cmdline or mark.encode() in cmdline else None


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child that exited: reap it (no zombie)
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ensure(service: str, settings: Settings, address: str, answers: Callable[[], bool],
            command: Callable[[Settings, Paths, int], list[str]]) -> bool:
    """Start ``service`` unless up already did (or something else answers there); True if it started it."""
    paths = Paths(settings.home)
    pid_file, log = paths.pid(service), paths.log(service)
    pid = _live_pid(pid_file, _mark(service, paths))
    if pid is not None:
        # Alive but maybe still starting (a concurrent up): give it the normal start time.
        if not _wait_started(service, settings, answers, pid):
            raise StackError(f"{service}: process {pid} (from {pid_file}) runs but does not answer; "
                             f"see {log}, or run `leadstream down` and `leadstream up` again")
        _say(f"{service}: already running (pid {pid})")
        return False
    pid_file.unlink(missing_ok=True)
    if answers():
        _say(f"{service}: something not started by leadstream already answers at {address}; using it")
        return False
    paths.run.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0  # error messages show this start's lines only
    cmd = command(settings, paths, offset)
    try:
        with log.open("ab") as out:
            # A new session: the service outlives this command and ignores the terminal's Ctrl-C.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=paths.home)
    except OSError as exc:
        raise StackError(f"{service}: could not run {cmd[0]}: {exc}") from exc
    pid_file.write_text(f"{proc.pid}\n")
    if not _wait_started(service, settings, answers, proc.pid):
        exited = not _alive(proc.pid)
        if not exited:
            _terminate(proc.pid)
        pid_file.unlink(missing_ok=True)
        why = "exited during startup" if exited else f"did not answer within {START_TIMEOUT_S[service]:.0f} s"
        raise StackError(f"{service}: did not start ({why}); see its log {log}:\n{_tail_file(log, offset)}")
    _say(f"{service}: started on {address} (log: {log})")
    return True


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not _alive(pid), STOP_TIMEOUT_S):
            os.kill(pid, signal.SIGKILL)
            _wait(lambda: not _alive(pid), 10.0)


# ---------------------------------------------------------------------------------------------- helpers


def _wait(ok: Callable[[], bool], timeout: float, keep_going: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``ok`` until it is true (True), the timeout passes or ``keep_going`` turns false (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if ok():
            return True
        if time.monotonic() >= deadline or not keep_going():
            return False
        time.sleep(0.25)


def _run(coro: Coroutine[Any, Any, bool]) -> bool:
    """Run a probe coroutine, also when called from inside a running event loop (in a thread then)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Failed probes while a broker starts are expected; keep the library from printing them as errors."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def _tail_file(path: Path, offset: int = 0, lines: int = 20) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return _tail(f.read().decode(errors="replace"), lines)
    except OSError:
        return "    (no log)"


def _say(line: str) -> None:
    print(line, flush=True)
