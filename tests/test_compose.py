"""docker-compose.yml and deploy/Dockerfile agree with the code (no Docker needed to check)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

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


def test_services_and_images(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "redis", "worker", "simulator"}
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["redis"]["command"] == ["redis-server", "--appendonly", "yes"]
    for name in ("worker", "simulator"):
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


@pytest.mark.parametrize("name", ["worker", "simulator"])
def test_app_services_run_real_subcommands(services: dict[str, Any], name: str) -> None:
    command = services[name]["command"]
    assert command[0] == "leadstream" and command[1] in subcommands()
    build_parser().parse_args(command[1:])  # the flags parse too (exits on an unknown one)
    env = services[name]["environment"]
    assert {k: env[k] for k in ("LEADSTREAM_KAFKA", "LEADSTREAM_REDIS")} == {
        "LEADSTREAM_KAFKA": "kafka:9092", "LEADSTREAM_REDIS": "redis://redis:6379/0"}
    if "ports" in services[name]:  # a published HTTP port must listen on all container interfaces
        assert env["LEADSTREAM_WEB_BIND"] == "0.0.0.0"
    settings = Settings.from_env(env)  # valid values for the settings parser
    assert (settings.kafka_bootstrap, settings.redis_url) == ("kafka:9092", "redis://redis:6379/0")
    assert set(services[name]["depends_on"]) == {"kafka", "redis"}
