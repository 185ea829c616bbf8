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
from dataclasses import dataclass, field, fields
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


def _token(name: str, raw: str) -> str:
    if raw and not re.fullmatch(r"[\x21-\x7e]{16,512}", raw):
        raise SettingsError(f"{name}=<hidden>: expected 16 to 512 printable characters without spaces "
                            "(e.g. the output of `openssl rand -hex 32`)")
    return raw


def _optional_path(name: str, raw: str) -> Path | None:
    return Path(raw).expanduser() if raw else None


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in allowed:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
        return raw

    return parse


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
    "dedupe_ids": Setting("LEADSTREAM_DEDUPE_IDS", "64", _int(1),
                          "How many of a lead's latest event ids are remembered (8-byte digests) to ignore a "
                          "repeated event_id; a Kafka redelivery is recognised by its offset whatever this is."),
    "tombstone_ttl_s": Setting("LEADSTREAM_TOMBSTONE_TTL_SECONDS", "2592000", _int(1),
                               "How long a deleted lead's tombstone is kept: late events from before the deletion "
                               "get a tombstone instead of bringing the lead back."),
    "batch_max_events": Setting("LEADSTREAM_BATCH_MAX_EVENTS", "500", _int(1),
                                "Most input messages the scoring agent takes in one micro-batch."),
    "batch_wait_s": Setting("LEADSTREAM_BATCH_WAIT_SECONDS", "0.005", _positive_float,
                            "Longest wait for a micro-batch to fill before it is processed (adds to latency)."),
    "rescore_every_s": Setting("LEADSTREAM_RESCORE_EVERY_SECONDS", "86400", _int(1),
                               "An open lead with no event is rescored (time decay) this long after its last score."),
    "rescore_rate": Setting("LEADSTREAM_RESCORE_RATE", "2000", _int(1),
                            "Most leads per second one worker rescores without events (decay, new model)."),
    "rescore_poll_s": Setting("LEADSTREAM_RESCORE_POLL_SECONDS", "1.0", _positive_float,
                              "How often a worker looks for leads due for rescoring."),
    "model_min_outcomes": Setting("LEADSTREAM_MODEL_MIN_OUTCOMES", "50", _int(1),
                                  "Closed deals of EACH class the model needs before it takes part in scores."),
    "model_poll_s": Setting("LEADSTREAM_MODEL_POLL_SECONDS", "2.0", _positive_float,
                            "How often scorers check Redis for a newer model checkpoint."),
    "session_timeout_s": Setting("LEADSTREAM_SESSION_TIMEOUT_SECONDS", "30", _int(6),
                                 "Kafka consumer session timeout: how soon a crashed worker's partitions move."),
    "api_port": Setting("LEADSTREAM_API_PORT", "6067", _int(1),
                        "Port of `leadstream api` (dashboard, read API, webhook ingest, metrics)."),
    "api_bind": Setting("LEADSTREAM_API_BIND", "127.0.0.1", _text,
                        "Address `leadstream api` listens on; anything but 127.0.0.1 needs LEADSTREAM_API_TOKEN."),
    "api_token": Setting("LEADSTREAM_API_TOKEN", "", _token,
                         "Bearer token every HTTP route except /healthz requires (worker and api). "
                         "Empty: no authentication, and both listen on 127.0.0.1 only."),
    "api_token_file": Setting("LEADSTREAM_API_TOKEN_FILE", "", _optional_path,
                              "A file holding the token instead (e.g. a mounted secret); not with LEADSTREAM_API_TOKEN."),
    "api_max_body_bytes": Setting("LEADSTREAM_API_MAX_BODY_BYTES", "1048576", _int(1024),
                                  "Largest webhook request body `POST /events` accepts (larger: 413)."),
    "api_max_batch": Setting("LEADSTREAM_API_MAX_BATCH", "1000", _int(1),
                             "Most events one `POST /events` request may carry (more: 413)."),
    "log_format": Setting("LEADSTREAM_LOG_FORMAT", "text", _choice("text", "json"),
                          "Log lines of the worker and api: text, or json (one object per line)."),
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
    dedupe_ids: int
    tombstone_ttl_s: int
    batch_max_events: int
    batch_wait_s: float
    rescore_every_s: int
    rescore_rate: int
    rescore_poll_s: float
    model_min_outcomes: int
    model_poll_s: float
    session_timeout_s: int
    api_port: int
    api_bind: str
    api_token: str = field(repr=False)
    api_token_file: Path | None
    api_max_body_bytes: int
    api_max_batch: int
    log_format: str
    home: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default: the process environment)."""
        env = os.environ if environ is None else environ
        values = {}
        for attr, s in SETTINGS.items():
            raw = env.get(s.env)
            values[attr] = s.parse(s.env, s.default if raw is None or raw == "" else raw)
        values["api_token"] = _resolve_token(values["api_token"], values["api_token_file"])
        return cls(**values)

    @staticmethod
    def is_set(attr: str, environ: Mapping[str, str] | None = None) -> bool:
        """Whether the user set ``attr`` explicitly (e.g. to use an existing broker)."""
        env = os.environ if environ is None else environ
        return bool(env.get(SETTINGS[attr].env))


def _resolve_token(token: str, path: Path | None) -> str:
    """The token from LEADSTREAM_API_TOKEN or from the file LEADSTREAM_API_TOKEN_FILE names (not both)."""
    if path is None:
        return token
    if token:
        raise SettingsError("LEADSTREAM_API_TOKEN and LEADSTREAM_API_TOKEN_FILE are both set: expected only one")
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SettingsError(f"LEADSTREAM_API_TOKEN_FILE={str(path)!r}: expected a readable file ({exc.strerror})") from None
    if not text:
        raise SettingsError(f"LEADSTREAM_API_TOKEN_FILE={str(path)!r}: expected a file holding the token, it is empty")
    return _token("LEADSTREAM_API_TOKEN_FILE's content", text)


assert [f.name for f in fields(Settings)] == list(SETTINGS), "Settings fields and SETTINGS table differ"


def describe() -> str:
    """A table of every setting, for ``leadstream settings`` and the README."""
    return "\n".join(f"{s.env:32} default {s.default!r}\n    {s.doc}" for s in SETTINGS.values())
