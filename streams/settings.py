"""leadstream's settings: the only module that reads the environment.

Every setting is a ``LEADSTREAM_*`` environment variable with a default that works on a
developer machine (``leadstream up`` starts Kafka and Redis on those defaults). A bad value
fails at start with :class:`SettingsError`, which names the variable and the expected form.

>>> s = Settings.from_env({"LEADSTREAM_KAFKA": "127.0.0.1:9092", "LEADSTREAM_PARTITIONS": "4"})
>>> s.kafka_bootstrap, s.partitions
('127.0.0.1:9092', 4)
>>> Settings.from_env({"LEADSTREAM_PARTITIONS": "many"})
Traceback (most recent call last):
...
streams.settings.SettingsError: LEADSTREAM_PARTITIONS='many': expected a whole number >= 1
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_SCORING_CONFIG = Path(__file__).resolve().parent.parent / "models" / "scoring.toml"


class SettingsError(ValueError):
    """A setting has a value of the wrong form."""


def _hostports(name: str, raw: str) -> str:
    parts = [p.strip() for p in raw.split(",")]
    if not parts or not all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", p) for p in parts):
        raise SettingsError(f"{name}={raw!r}: expected host:port[,host:port...], e.g. 127.0.0.1:9092")
    return ",".join(parts)


def _redis_url(name: str, raw: str) -> str:
    url = urlparse(raw)
    if url.scheme not in ("redis", "rediss", "unix") or not (url.hostname or url.path):
        raise SettingsError(f"{name}={raw!r}: expected a Redis URL such as redis://127.0.0.1:6379/0")
    return raw


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise SettingsError(f"{name}={raw!r}: expected a whole number >= {minimum}")
        return value

    return parse


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SettingsError(f"{name}={raw!r}: expected a number > 0")
    return value


def _topic(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._\-]{1,249}", raw):
        raise SettingsError(f"{name}={raw!r}: expected a Kafka topic name (letters, digits, '.', '_', '-')")
    return raw


def _existing_file(name: str, raw: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(f"{name}={raw!r}: expected the path of an existing scoring config file (TOML)")
    return path


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name}={raw!r}: expected a directory path")
    return Path(raw).expanduser()


def _text(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._\-]{1,100}", raw):
        raise SettingsError(f"{name}={raw!r}: expected letters, digits, '.', '_' or '-'")
    return raw


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    parse: Callable[[str, str], Any]
    doc: str


# The single table of settings: attribute name -> environment variable, default, parser, meaning.
SETTINGS: dict[str, Setting] = {
    "kafka_bootstrap": Setting("LEADSTREAM_KAFKA", "127.0.0.1:9092", _hostports,
                               "Kafka bootstrap servers. When set, `leadstream up` uses this broker and starts none."),
    "redis_url": Setting("LEADSTREAM_REDIS", "redis://127.0.0.1:6379/0", _redis_url,
                         "Redis URL. When set, `leadstream up` uses this server and starts none."),
    "app_id": Setting("LEADSTREAM_APP_ID", "leadstream", _text,
                      "Faust application id (the Kafka consumer group) and prefix of its internal topics."),
    "topic_web": Setting("LEADSTREAM_TOPIC_WEB", "leads.web-events", _topic, "Input: behavioural events."),
    "topic_crm": Setting("LEADSTREAM_TOPIC_CRM", "leads.crm-events", _topic, "Input: explicit and CRM events."),
    "topic_scores": Setting("LEADSTREAM_TOPIC_SCORES", "leads.scores", _topic, "Output: one score per accepted event."),
    "topic_hot": Setting("LEADSTREAM_TOPIC_HOT", "leads.hot", _topic, "Output: a lead crossed the hot threshold."),
    "topic_dead_letter": Setting("LEADSTREAM_TOPIC_DEAD_LETTER", "leads.dead-letter", _topic,
                                 "Output: every rejected message with the reason and its raw bytes."),
    "topic_training": Setting("LEADSTREAM_TOPIC_TRAINING", "leads.training", _topic,
                              "Internal, one partition: labelled snapshots of closed deals for the single trainer."),
    "partitions": Setting("LEADSTREAM_PARTITIONS", "8", _int(1), "Partitions of the topics the worker creates."),
    "web_port": Setting("LEADSTREAM_WEB_PORT", "6066", _int(1), "Port of the worker's HTTP endpoint."),
    "web_bind": Setting("LEADSTREAM_WEB_BIND", "127.0.0.1", _text,
                        "Address the worker's HTTP endpoint listens on (0.0.0.0 inside a container)."),
    "scoring_config": Setting("LEADSTREAM_SCORING_CONFIG", str(DEFAULT_SCORING_CONFIG), _existing_file,
                              "Path of the points/grades/threshold config (TOML)."),
    "max_event_bytes": Setting("LEADSTREAM_MAX_EVENT_BYTES", "65536", _int(256),
                               "Larger input values are rejected to the dead-letter topic."),
    "dedupe_ttl_s": Setting("LEADSTREAM_DEDUPE_TTL_SECONDS", "604800", _int(1),
                            "How long a lead's seen event ids are kept (re-armed on every event of the lead)."),
    "model_min_outcomes": Setting("LEADSTREAM_MODEL_MIN_OUTCOMES", "50", _int(1),
                                  "Closed deals of EACH class the model needs before it takes part in scores."),
    "model_poll_s": Setting("LEADSTREAM_MODEL_POLL_SECONDS", "2.0", _positive_float,
                            "How often scorers check Redis for a newer model checkpoint."),
    "model_batch_every": Setting("LEADSTREAM_MODEL_BATCH_EVERY", "1000", _int(10),
                                 "Closed deals between two refits of the tournament's batch learner (batch_hgb, "
                                 "the vendors' cadence; also `leadstream evaluate`'s default --batch-every)."),
    "session_timeout_s": Setting("LEADSTREAM_SESSION_TIMEOUT_SECONDS", "30", _int(6),
                                 "Kafka consumer session timeout: how soon a crashed worker's partitions move."),
    "home": Setting("LEADSTREAM_HOME", str(Path("~/.cache/leadstream").expanduser()), _path,
                    "Where `leadstream up` keeps the Kafka jars, data, logs and pid files."),
}


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str
    redis_url: str
    app_id: str
    topic_web: str
    topic_crm: str
    topic_scores: str
    topic_hot: str
    topic_dead_letter: str
    topic_training: str
    partitions: int
    web_port: int
    web_bind: str
    scoring_config: Path
    max_event_bytes: int
    dedupe_ttl_s: int
    model_min_outcomes: int
    model_poll_s: float
    model_batch_every: int
    session_timeout_s: int
    home: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default: the process environment)."""
        env = os.environ if environ is None else environ
        values = {}
        for attr, s in SETTINGS.items():
            raw = env.get(s.env)
            values[attr] = s.parse(s.env, s.default if raw is None or raw == "" else raw)
        return cls(**values)

    @staticmethod
    def is_set(attr: str, environ: Mapping[str, str] | None = None) -> bool:
        """Whether the user set ``attr`` explicitly (e.g. to use an existing broker)."""
        env = os.environ if environ is None else environ
        return bool(env.get(SETTINGS[attr].env))


assert [f.name for f in fields(Settings)] == list(SETTINGS), "Settings fields and SETTINGS table differ"


def describe() -> str:
    """A table of every setting, for ``leadstream settings`` and the README."""
    return "\n".join(f"{s.env:32} default {s.default!r}\n    {s.doc}" for s in SETTINGS.values())
