"""A test's own Kafka broker and Redis server, on free ports, that the test may kill and restart.

The session's shared broker and Redis are never touched. The broker runs from the jars
``leadstream up`` fetched (``streams.stack``), optionally with a SASL_SSL listener (SCRAM users,
a self-signed CA made here with openssl).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from streams import stack as stack_mod
from streams.settings import Settings

SCRAM_ITERATIONS = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ok, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace").splitlines()[-20:] if log and log.exists() else []
            raise RuntimeError(f"{what} not ready within {timeout} s\n" + "\n".join(tail))
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Tls:
    ca_pem: Path
    keystore: Path  # PKCS12: the broker's key and certificate (SAN 127.0.0.1, localhost)
    password: str


def make_tls(directory: Path, password: str = "keystore-pass") -> Tls:
    """A self-signed CA and a server certificate it signed, for 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=leadstream-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.pem")
    run("pkcs12", "-export", "-in", "server.pem", "-inkey", "server.key", "-certfile", "ca.pem",
        "-out", "server.p12", "-passout", f"pass:{password}")
    return Tls(d / "ca.pem", d / "server.p12", password)


# ---------------------------------------------------------------------------------------------- Kafka


@dataclass
class Broker:
    """A single-node KRaft broker+controller. ``kill()`` is kill -9; ``start()`` again keeps its data."""

    directory: Path
    lib: Path
    port: int = field(default_factory=free_port)
    internal_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    tls: Tls | None = None  # set: the client listener is SASL_SSL (SCRAM), else PLAINTEXT
    users: dict[str, str] = field(default_factory=dict)  # SCRAM users (SHA-256 and SHA-512)
    proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "kafka.log"

    def config(self) -> str:
        client = "SASL_SSL" if self.tls else "PLAINTEXT"
        lines = [
            "process.roles=broker,controller", "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{self.internal_port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=CLIENT://127.0.0.1:{self.port},INTERNAL://127.0.0.1:{self.internal_port}",
            "controller.listener.names=CONTROLLER", "inter.broker.listener.name=INTERNAL",
            f"listener.security.protocol.map=CLIENT:{client},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={self.directory / 'data'}",
            "offsets.topic.replication.factor=1", "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1", "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1", "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0", "auto.create.topics.enable=true",
        ]
        if self.tls:
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            lines += [
                "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512",
                f"listener.name.client.scram-sha-256.sasl.jaas.config={scram}",
                f"listener.name.client.scram-sha-512.sasl.jaas.config={scram}",
                "ssl.keystore.type=PKCS12", f"ssl.keystore.location={self.tls.keystore}",
                f"ssl.keystore.password={self.tls.password}", f"ssl.key.password={self.tls.password}",
            ]
        return "\n".join(lines) + "\n"

    def _base(self) -> tuple[list[str], Path]:
        props = self.directory / "server.properties"
        log4j = self.directory / "log4j2.properties"
        java = stack_mod._java(Settings.from_env().java_home)
        return [java, "-Xms128m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{self.lib}/*"], props

    def start(self, timeout: float = 90.0) -> Broker:
        self.directory.mkdir(parents=True, exist_ok=True)
        base, props = self._base()
        props.write_text(self.config())
        (self.directory / "log4j2.properties").write_text(stack_mod.LOG4J2)
        if not (self.directory / "data" / "meta.properties").exists():
            scram = [a for user, pw in self.users.items() for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512")
                     for a in ("--add-scram", f"{mech}=[name={user},password={pw},iterations={SCRAM_ITERATIONS}]")]
            with self.log.open("ab") as out:
                subprocess.run([*base, "kafka.tools.StorageTool", "format", "-t", stack_mod._cluster_id(),
                                "-c", str(props), *scram], check=True, stdout=out, stderr=subprocess.STDOUT)
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([*base, "kafka.Kafka", str(props)], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait(lambda: b"Kafka Server started" in self.log.read_bytes()[offset:]
              or self.proc.poll() is not None, timeout, f"broker on {self.port}", self.log)
        if self.proc.poll() is not None:
            raise RuntimeError(f"broker exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        return self

    def kill(self) -> None:
        """kill -9: no clean shutdown, as a crashed machine's process."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.directory / "data", ignore_errors=True)


def start_broker(directory: Path, *, tls: Tls | None = None, users: dict[str, str] | None = None) -> Broker:
    lib = stack_mod.ensure_kafka_jars(Settings.from_env())
    return Broker(directory, lib, tls=tls, users=users or {}).start()


# ---------------------------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A redis-server with AOF fsynced on every write: a kill -9 loses nothing it acknowledged."""

    directory: Path
    password: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        with (self.directory / "redis.log").open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            try:
                return redis.Redis(port=self.port, password=self.password, socket_timeout=1).ping()
            except redis.RedisError:
                return False

        _wait(answers, 20, f"redis on {self.port}", self.directory / "redis.log")
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
