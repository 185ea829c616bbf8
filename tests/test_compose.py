"""docker-compose.yml and deploy/Dockerfile agree with the code (no Docker needed to check)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.api import check_bind
from streams.cli import build_parser
from streams.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def subcommands() -> set[str]:
    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def interpolate(env: Mapping[str, str], shell: Mapping[str, str]) -> dict[str, str]:
    """The environment compose gives a container: ``${VAR:-default}`` and ``${VAR}`` resolved from ``shell``."""
    def one(match: re.Match[str]) -> str:
        return shell.get(match["name"]) or (match["default"] or "")

    return {k: re.sub(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}", one, str(v)) for k, v in env.items()}


def test_services_and_images(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "redis", "worker", "trainer", "api", "simulator"}
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["command"] == ["redis-server", "--appendonly", "yes", "--save", ""]  # AOF, no RDB forks
    for name in ("worker", "trainer", "api", "simulator"):
        assert services[name]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "RUN pip install ." in dockerfile


def test_ports(services: dict[str, Any]) -> None:
    # The host's 9092 reaches the listener advertised as 127.0.0.1:9092 (leadstream's default bootstrap).
    assert services["kafka"]["ports"] == ["9092:9094"]
    env = services["kafka"]["environment"]
    assert "HOST://:9094" in env["KAFKA_LISTENERS"] and "HOST://127.0.0.1:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "INTERNAL://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["redis"]["ports"] == ["6379:6379"]


@pytest.mark.parametrize("name", ["worker", "trainer", "api", "simulator"])
def test_app_services_run_real_subcommands(services: dict[str, Any], name: str) -> None:
    command = services[name]["command"]
    assert command[0] == "leadstream" and command[1] in subcommands()
    build_parser().parse_args(command[1:])  # the flags parse too (exits on an unknown one)
    env = interpolate(services[name]["environment"], {})
    assert {k: env[k] for k in ("LEADSTREAM_KAFKA", "LEADSTREAM_REDIS")} == {
        "LEADSTREAM_KAFKA": "kafka:9092", "LEADSTREAM_REDIS": "redis://redis:6379/0"}
    settings = Settings.from_env(env)  # valid values for the settings parser
    assert (settings.kafka_bootstrap, settings.redis_url) == ("kafka:9092", "redis://redis:6379/0")
    assert set(services[name]["depends_on"]) == {"kafka", "redis"}
    for published in services[name].get("ports", []):
        # Each HTTP port listens on all container interfaces, and is published on the host's
        # loopback address only (the demo token is in this repository).
        host, port, inner = published.split(":")
        assert host == "127.0.0.1" and port == inner
        bind, own_port = ((settings.web_bind, settings.web_port) if name == "worker"
                          else (settings.api_bind, settings.api_port))
        assert (bind, own_port) == ("0.0.0.0", int(inner))


def test_scoring_and_training_run_in_their_own_workers(services: dict[str, Any]) -> None:
    roles = {name: Settings.from_env(interpolate(services[name]["environment"], {})).worker_roles
             for name in ("worker", "trainer")}
    assert roles == {"worker": "scoring", "trainer": "training"}


def test_the_api_service_starts_with_the_demo_token_or_the_shells(services: dict[str, Any]) -> None:
    """`leadstream api` refuses 0.0.0.0 without a token: compose always gives it one, the same as the worker's."""
    api, worker = services["api"]["environment"], services["worker"]["environment"]
    demo = Settings.from_env(interpolate(api, {}))
    assert demo.api_token == "leadstream-demo-token-change-me" and check_bind(demo) == "0.0.0.0"
    own = "f" * 64
    assert Settings.from_env(interpolate(api, {"LEADSTREAM_API_TOKEN": own})).api_token == own
    assert Settings.from_env(interpolate(worker, {"LEADSTREAM_API_TOKEN": own})).api_token == own
    assert api["LEADSTREAM_API_TOKEN"] == worker["LEADSTREAM_API_TOKEN"]
    readme = (ROOT / "README.md").read_text()
    assert "leadstream-demo-token-change-me" in readme and "6067/dashboard" in readme
