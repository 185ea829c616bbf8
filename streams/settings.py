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
from urllib.parse import urlparse, urlunparse

DEFAULT_SCORING_CONFIG = Path(__file__).resolve().parent.parent / "models" / "scoring.toml"


class SettingsError(ValueError):
    """A setting has a value of the wrong form."""


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Secret:
    """A password or token: printed, logged and repr'd as ``***``; :meth:`reveal` gives the value.

    >>> s = Secret("hunter2")
    >>> str(s), repr(s), f"{s}", s.reveal(), bool(Secret(""))
    ('***', "Secret('***')", '***', 'hunter2', False)
    """

    value: str = field(repr=False)

    def reveal(self) -> str:
        return self.value

    def __str__(self) -> str:
        return "***" if self.value else ""

    def __repr__(self) -> str:
        return f"Secret({str(self)!r})"

    def __bool__(self) -> bool:
        return bool(self.value)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs).

    >>> redact_url("rediss://app:s3cret@redis.internal:6380/0"), redact_url("redis://127.0.0.1:6379/0")
    ('rediss://app:***@redis.internal:6380/0', 'redis://127.0.0.1:6379/0')
    """
    parts = urlparse(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunparse(parts._replace(netloc=f"{user}:***@{netloc}"))


def _hostports(name: str, raw: str) -> str:
    parts = [p.strip() for p in raw.split(",")]
    if not parts or not all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", p) for p in parts):
        raise SettingsError(f"{name}={raw!r}: expected host:port[,host:port...], e.g. 127.0.0.1:9092")
    return ",".join(parts)


def _redis_url(name: str, raw: str) -> str:
    url = urlparse(raw)
    if url.scheme not in ("redis", "rediss", "unix") or not (url.hostname or url.path):
        # The value may hold a password: never echo it.
        raise SettingsError(f"{name}={redact_url(raw)!r}: expected a Redis URL such as redis://127.0.0.1:6379/0, "
                            "redis://USER:PASSWORD@HOST:6379/0, or rediss://... for TLS")
    return raw


def _upper_choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw.upper() not in choices:
            raise SettingsError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return raw.upper()

    return parse


def _optional_file(name: str, raw: str) -> Path | None:
    if raw == "-":
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError(f"{name}={raw!r}: expected the path of an existing, readable file (PEM)")
    return path


def _secret(name: str, raw: str) -> Secret:
    return Secret(raw)


def _any_text(name: str, raw: str) -> str:
    if len(raw) > 1000 or any(c in raw for c in "\r\n\0"):
        raise SettingsError(f"{name}: expected one line of at most 1000 characters")
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


def _float(zero_allowed: bool) -> Callable[[str, str], float]:
    """A parser of a number > 0, or >= 0 when ``zero_allowed`` (NaN is neither)."""
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not (value >= 0 if zero_allowed else value > 0):
            raise SettingsError(f"{name}={raw!r}: expected a number {'>=' if zero_allowed else '>'} 0")
        return value

    return parse


_positive_float = _float(zero_allowed=False)
_non_negative_float = _float(zero_allowed=True)


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


WORKER_ROLES = ("scoring", "training")


def _nice(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise SettingsError(f"{name}={raw!r}: expected a Unix nice value, a whole number from 0 (as the scorer) "
                            "to 19 (only the CPU the rest leaves)")
    return value


def _roles(name: str, raw: str) -> str:
    roles = [r.strip() for r in raw.split(",") if r.strip()]
    wrong = [r for r in roles if r not in WORKER_ROLES]
    if not roles or wrong:
        raise SettingsError(f"{name}={raw!r}: expected a comma-separated list of {', '.join(WORKER_ROLES)} "
                            "(e.g. scoring,training)")
    return ",".join(r for r in WORKER_ROLES if r in roles)


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    parse: Callable[[str, str], Any]
    doc: str
    secret: bool = False  # masked when shown; may also come from the file named by ``<env>_FILE``


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
    "max_future_skew_s": Setting("LEADSTREAM_MAX_FUTURE_SKEW_SECONDS", "86400", _int(1),
                                 "Events whose `ts` is further ahead of the receive time are rejected to the "
                                 "dead-letter topic (a sender's wrong clock)."),
    "dedupe_ids": Setting("LEADSTREAM_DEDUPE_IDS", "64", _int(1),
                          "How many of a lead's latest event ids are remembered (8-byte digests) to ignore a "
                          "repeated event_id; a Kafka redelivery is recognised by its offset whatever this is."),
    "tombstone_ttl_s": Setting("LEADSTREAM_TOMBSTONE_TTL_SECONDS", "2592000", _int(1),
                               "How long a deleted lead's tombstone is kept: late events from before the deletion "
                               "get a tombstone instead of bringing the lead back."),
    "batch_max_events": Setting("LEADSTREAM_BATCH_MAX_EVENTS", "500", _int(1),
                                "Most input messages the scoring loop takes in one micro-batch."),
    "batch_wait_s": Setting("LEADSTREAM_BATCH_WAIT_SECONDS", "0.1", _positive_float,
                            "How long the scoring loop waits for input when none has arrived: input is taken "
                            "as soon as it arrives whatever this is, so it is how often an idle worker wakes "
                            "(at 0.005, 3-5% of a core for nothing) and settles its last batch. A batch never "
                            "waits to fill: it takes what was fetched meanwhile, so it grows with the load."),
    "batch_linger_s": Setting("LEADSTREAM_BATCH_LINGER_SECONDS", "0", _non_negative_float,
                              "How long a batch smaller than LEADSTREAM_BATCH_MAX_EVENTS waits for more input "
                              "before it is processed (0: never). Each batch has a fixed cost (Redis and Kafka "
                              "round trips): at moderate rates a short wait means fewer, larger batches."),
    "commit_every_s": Setting("LEADSTREAM_COMMIT_EVERY_SECONDS", "1.0", _positive_float,
                              "How often the scoring loop commits the input offsets Kafka has acknowledged the "
                              "outputs of. A commit costs a Redis and a Kafka round trip; after a crash, what "
                              "was not committed is read again and changes nothing (the offset guard)."),
    "rescore_every_s": Setting("LEADSTREAM_RESCORE_EVERY_SECONDS", "86400", _int(1),
                               "An open lead with no event is rescored (time decay) this long after its last score."),
    "rescore_rate": Setting("LEADSTREAM_RESCORE_RATE", "1000", _int(1),
                            "Most leads per second one worker rescores without events (decay, new model); "
                            "at most a tenth of it while events are arriving (spread between the event batches)."),
    "rescore_model_every_s": Setting("LEADSTREAM_RESCORE_MODEL_EVERY_SECONDS", "600", _int(0),
                                     "After a new model version, open leads are rescored in a background pass; a "
                                     "new pass starts at most this often (versions come with every checkpoint)."),
    "rescore_poll_s": Setting("LEADSTREAM_RESCORE_POLL_SECONDS", "1.0", _positive_float,
                              "How often a worker looks for leads due for rescoring."),
    "model_min_outcomes": Setting("LEADSTREAM_MODEL_MIN_OUTCOMES", "50", _int(1),
                                  "Closed deals of EACH class the model needs before it takes part in scores."),
    "model_poll_s": Setting("LEADSTREAM_MODEL_POLL_SECONDS", "2.0", _positive_float,
                            "How often scorers check Redis for a newer model checkpoint."),
    "model_batch_every": Setting("LEADSTREAM_MODEL_BATCH_EVERY", "1000", _int(10),
                                 "Closed deals between two refits of the tournament's batch learner (batch_hgb, "
                                 "the vendors' cadence; also `leadstream evaluate`'s default --batch-every)."),
    "checkpoint_every_deals": Setting("LEADSTREAM_CHECKPOINT_EVERY_DEALS", "100", _int(1),
                                      "The trainer saves its checkpoint (and the serving model) after this many "
                                      "closed deals, with the training offset: a crash replays the deals since."),
    "checkpoint_every_s": Setting("LEADSTREAM_CHECKPOINT_EVERY_SECONDS", "10.0", _positive_float,
                                  "... or this many seconds after the first deal not yet saved, whichever is first."),
    "worker_roles": Setting("LEADSTREAM_WORKER_ROLES", "scoring,training", _roles,
                            "What `leadstream worker` runs: scoring (the input topics, rescoring), training (the "
                            "trainer and its checkpoints), or both. Run the trainer as its own worker "
                            "(LEADSTREAM_WORKER_ROLES=training) when latency matters: a deal's learning and a "
                            "checkpoint then never take turns from the scoring loop."),
    "trainer_nice": Setting("LEADSTREAM_TRAINER_NICE", "19", _nice,
                            "The trainer's CPU priority, a Unix nice value (0: the scorer's; 19: only the CPU the "
                            "rest leaves). Learning a deal takes milliseconds, a batch refit 0.1-0.5 s of a core; "
                            "at low priority they wait for a free core instead of taking one from scoring: the "
                            "event -> score tail stays low on a machine short of cores, and the trainer learns "
                            "every deal, later. A worker with only the training role lowers itself whole (and, "
                            "when it leads its own session, the session's autogroup: Linux shares the CPU between "
                            "sessions first); a worker with both roles lowers the trainer's thread."),
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
    "api_cache_s": Setting("LEADSTREAM_API_CACHE_SECONDS", "2.0", _positive_float,
                           "How stale the api's aggregates (funnel, team, success curve, model) and the rendered "
                           "dashboard may be: read and rendered at most once per this many seconds (docs/api.md)."),
    "log_format": Setting("LEADSTREAM_LOG_FORMAT", "text", _choice("text", "json"),
                          "Log lines of the worker and api: text, or json (one object per line)."),
    "event_loop": Setting("LEADSTREAM_EVENT_LOOP", "uvloop", _choice("uvloop", "asyncio"),
                          "The worker's event loop: uvloop (libuv, less CPU per Kafka and Redis round trip) "
                          "or asyncio (the standard library's)."),
    "java_home": Setting("LEADSTREAM_JAVA_HOME", "", _optional_path,
                         "The Java 17+ installation the broker `leadstream up` starts runs on (empty: JAVA_HOME "
                         "if set, else `java` on the PATH)."),
    "home": Setting("LEADSTREAM_HOME", str(Path("~/.cache/leadstream").expanduser()), _path,
                    "Where `leadstream up` keeps the Kafka jars, data, logs and pid files."),
    "kafka_security_protocol": Setting("LEADSTREAM_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT",
                                       _upper_choice(*KAFKA_SECURITY_PROTOCOLS),
                                       "Kafka security.protocol of every client: PLAINTEXT, SSL, SASL_PLAINTEXT or "
                                       "SASL_SSL."),
    "kafka_sasl_mechanism": Setting("LEADSTREAM_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512",
                                    _upper_choice(*KAFKA_SASL_MECHANISMS),
                                    "SASL mechanism with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."),
    "kafka_sasl_username": Setting("LEADSTREAM_KAFKA_SASL_USERNAME", "", _any_text,
                                   "SASL user name (required with SASL_PLAINTEXT / SASL_SSL)."),
    "kafka_sasl_password": Setting("LEADSTREAM_KAFKA_SASL_PASSWORD", "", _secret,
                                   "SASL password (required with SASL_*).", secret=True),
    "kafka_ssl_cafile": Setting("LEADSTREAM_KAFKA_SSL_CAFILE", "-", _optional_file,
                                "With SSL / SASL_SSL: PEM file of the CA that signed the brokers' certificates "
                                "('-' = the system's CAs)."),
    "kafka_ssl_certfile": Setting("LEADSTREAM_KAFKA_SSL_CERTFILE", "-", _optional_file,
                                  "With SSL / SASL_SSL: PEM client certificate, for brokers that require mutual TLS "
                                  "('-' = none)."),
    "kafka_ssl_keyfile": Setting("LEADSTREAM_KAFKA_SSL_KEYFILE", "-", _optional_file,
                                 "PEM private key of the client certificate ('-' = in the certificate file)."),
    "redis_password": Setting("LEADSTREAM_REDIS_PASSWORD", "", _secret,
                              "Redis password (requirepass, or the ACL user's named in the URL, "
                              "redis://USER@HOST:PORT/DB); the alternative to a password in LEADSTREAM_REDIS.",
                              secret=True),
    "redis_ssl_cafile": Setting("LEADSTREAM_REDIS_SSL_CAFILE", "-", _optional_file,
                                "With a rediss:// URL: PEM file of the CA that signed Redis's certificate "
                                "('-' = the system's CAs)."),
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
    max_future_skew_s: int
    dedupe_ids: int
    tombstone_ttl_s: int
    batch_max_events: int
    batch_wait_s: float
    batch_linger_s: float
    commit_every_s: float
    rescore_every_s: int
    rescore_rate: int
    rescore_model_every_s: int
    rescore_poll_s: float
    model_min_outcomes: int
    model_poll_s: float
    model_batch_every: int
    checkpoint_every_deals: int
    checkpoint_every_s: float
    worker_roles: str
    trainer_nice: int
    session_timeout_s: int
    api_port: int
    api_bind: str
    api_token: str = field(repr=False)
    api_token_file: Path | None
    api_max_body_bytes: int
    api_max_batch: int
    api_cache_s: float
    log_format: str
    event_loop: str
    java_home: Path | None
    home: Path
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: Secret
    kafka_ssl_cafile: Path | None
    kafka_ssl_certfile: Path | None
    kafka_ssl_keyfile: Path | None
    redis_password: Secret
    redis_ssl_cafile: Path | None

    def __post_init__(self) -> None:
        """Settings that only make sense together."""
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise SettingsError(f"LEADSTREAM_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                                "LEADSTREAM_KAFKA_SASL_USERNAME and LEADSTREAM_KAFKA_SASL_PASSWORD "
                                "(or LEADSTREAM_KAFKA_SASL_PASSWORD_FILE)")
        if urlparse(self.redis_url).password is not None and self.redis_password:
            raise SettingsError("LEADSTREAM_REDIS has a password and LEADSTREAM_REDIS_PASSWORD is set too: "
                                "expected the password in one place only")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default: the process environment)."""
        env = os.environ if environ is None else environ
        values = {}
        for attr, s in SETTINGS.items():
            raw = _secret_from_file(s, env) if s.secret else None
            raw = env.get(s.env) if raw is None else raw
            values[attr] = s.parse(s.env, s.default if raw is None or raw == "" else raw)
        values["api_token"] = _resolve_token(values["api_token"], values["api_token_file"])
        # Java's own variable, the one every Java tool reads: LEADSTREAM_JAVA_HOME only overrides it.
        values["java_home"] = values["java_home"] or _optional_path("JAVA_HOME", env.get("JAVA_HOME", ""))
        return cls(**values)

    def runs(self, role: str) -> bool:
        """Whether this worker runs ``role`` (``scoring`` or ``training``; LEADSTREAM_WORKER_ROLES)."""
        return role in self.worker_roles.split(",")

    def to_env(self) -> dict[str, str]:
        """Every setting as the environment variable that gives it (secrets revealed): for child processes."""
        return {s.env: _env_text(getattr(self, attr)) for attr, s in SETTINGS.items()
                if getattr(self, attr) is not None and attr != "api_token_file"}  # the token itself is passed

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


def _secret_from_file(s: Setting, env: Mapping[str, str]) -> str | None:
    """A secret's value from the file ``<env>_FILE`` names (a mounted Kubernetes secret), if set."""
    path = env.get(f"{s.env}_FILE")
    if not path:
        return None
    if env.get(s.env):
        raise SettingsError(f"{s.env} and {s.env}_FILE are both set: expected one of them")
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{s.env}_FILE={path!r}: expected a readable file holding the secret "
                            f"({type(exc).__name__})") from None


def _env_text(value: Any) -> str:
    if isinstance(value, Secret):
        return value.reveal()
    return "-" if value is None else str(value)


def _shown(setting: Setting, env: Mapping[str, str]) -> str:
    """The value in use as ``leadstream settings`` shows it ('' if not set): secrets and URL passwords masked."""
    if setting.secret and env.get(f"{setting.env}_FILE"):
        return f"*** (from {setting.env}_FILE)"
    raw = env.get(setting.env)
    if not raw:
        return ""
    return "***" if setting.secret else repr(redact_url(raw) if setting.parse is _redis_url else raw)


def describe(environ: Mapping[str, str] | None = None) -> str:
    """A table of every setting, for ``leadstream settings`` and the README: default, meaning and,
    for those set in ``environ`` (default: the process environment), the value in use (secrets as ``***``)."""
    env = os.environ if environ is None else environ
    lines = []
    for s in SETTINGS.values():
        shown = _shown(s, env)
        extra = f" Secret: or {s.env}_FILE, a file holding it." if s.secret else ""
        lines.append(f"{s.env:34} default {s.default!r}{f'  now {shown}' if shown else ''}\n    {s.doc}{extra}")
    return "\n".join(lines)
