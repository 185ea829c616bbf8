"""Every Kafka and Redis client the project opens gets its connection settings here.

One place turns :class:`Settings` into aiokafka keyword arguments (security protocol, SASL,
TLS), Faust broker credentials and a Redis client; and one preflight check turns a wrong
password, CA or protocol into one clear line naming the setting, before a worker starts.

>>> from streams.settings import Settings
>>> kafka_kwargs(Settings.from_env({}))
{'bootstrap_servers': '127.0.0.1:9092', 'security_protocol': 'PLAINTEXT'}
>>> kw = kafka_kwargs(Settings.from_env({"LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
...     "LEADSTREAM_KAFKA_SASL_USERNAME": "scorer", "LEADSTREAM_KAFKA_SASL_PASSWORD": "pw"}))
>>> kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"], "ssl_context" in kw
('SCRAM-SHA-512', 'scorer', 'pw', False)
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import Any
from urllib.parse import urlparse

import faust
import hiredis
import redis
import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner, murmur2

from streams.settings import Settings, redact_url

CHECK_TIMEOUT_S = 10.0


class ConnectionCheckError(RuntimeError):
    """Kafka or Redis refused the configured connection; the message names the setting to fix."""


# ---------------------------------------------------------------------------------------------- Kafka


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for SSL / SASL_SSL (None otherwise): the CA, and a client certificate if given."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    return create_ssl_context(cafile=settings.kafka_ssl_cafile, certfile=settings.kafka_ssl_certfile,
                              keyfile=settings.kafka_ssl_keyfile)


def kafka_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin, ``AIOKafkaClient``)."""
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap,
                              "security_protocol": settings.kafka_security_protocol}
    context = kafka_ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL_"):
        kwargs |= {"sasl_mechanism": settings.kafka_sasl_mechanism,
                   "sasl_plain_username": settings.kafka_sasl_username,
                   "sasl_plain_password": settings.kafka_sasl_password.reveal()}
    return kwargs


@functools.lru_cache(maxsize=65_536)  # a lead's key comes back with each of its events and rescores
def key_hash(key: bytes) -> int:
    """Kafka's default partitioner's hash of a record key (murmur2, made positive), memoised:
    aiokafka's murmur2 is pure Python, ~5 µs a key.

    >>> key_hash(b"lead-1") == murmur2(b"lead-1") & 0x7FFFFFFF
    True
    """
    return murmur2(key) & 0x7FFFFFFF


class KeyPartitioner(DefaultPartitioner):
    """aiokafka's default partitioner (the Java client's) with the key hash memoised: the same
    partition for every key, so a lead's outputs stay where every other Kafka client puts them.

    >>> KeyPartitioner()(b"lead-1", [0, 1, 2, 3], []) == DefaultPartitioner()(b"lead-1", [0, 1, 2, 3], [])
    True
    """

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:  # no key: a random partition, as the default does
            return super().__call__(key, all_partitions, available)
        return all_partitions[key_hash(key) % len(all_partitions)]


def faust_credentials(settings: Settings) -> faust.auth.Credentials | None:
    """Faust's ``broker_credentials`` for the same connection as :func:`kafka_kwargs` (None = PLAINTEXT)."""
    context = kafka_ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL_"):
        # Faust sets SASL_SSL itself when a context is given, SASL_PLAINTEXT otherwise.
        return faust.SASLCredentials(username=settings.kafka_sasl_username,
                                     password=settings.kafka_sasl_password.reveal(),
                                     mechanism=settings.kafka_sasl_mechanism, ssl_context=context)
    if context is not None:
        return faust.SSLCredentials(context)
    return None


# ---------------------------------------------------------------------------------------------- Redis


def redis_kwargs(settings: Settings) -> dict[str, Any]:
    """What the URL cannot say: the password from LEADSTREAM_REDIS_PASSWORD(_FILE), the TLS CA file."""
    kwargs: dict[str, Any] = {}
    if settings.redis_password:
        kwargs["password"] = settings.redis_password.reveal()
    if settings.redis_ssl_cafile is not None and urlparse(settings.redis_url).scheme == "rediss":
        kwargs["ssl_ca_certs"] = str(settings.redis_ssl_cafile)
    return kwargs


def redis_client(settings: Settings, url: str | None = None, **extra: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` (default: LEADSTREAM_REDIS) with the configured credentials."""
    client = aioredis.Redis.from_url(url or settings.redis_url, **redis_kwargs(settings), **extra)
    pool = client.connection_pool
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return client


def pack_command(args: tuple[Any, ...]) -> bytes:
    """One command in Redis' protocol, packed by hiredis in C (str, bytes, numbers; a bytearray
    as bytes, as redis-py's own packers send it); a value hiredis cannot pack (e.g. a bool) raises
    redis' DataError.

    >>> pack_command(("HMGET", "k", b"v", 2))
    b'*4\\r\\n$5\\r\\nHMGET\\r\\n$1\\r\\nk\\r\\n$1\\r\\nv\\r\\n$1\\r\\n2\\r\\n'
    """
    try:
        return hiredis.pack_command(args)  # the usual arguments: one C call
    except TypeError:
        pass
    try:
        return hiredis.pack_command(tuple(bytes(a) if isinstance(a, (bytearray, memoryview)) else a for a in args))
    except TypeError as exc:
        raise DataError(str(exc)) from None


class HiredisPacking:
    """Commands packed by hiredis in C: redis-py's asyncio connections pack them in Python, which
    cost about a tenth of the worker's time (a batch's pipelines carry thousands of arguments).
    The bytes are the same."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # e.g. "CONFIG GET": separate arguments
            args = (*args[0].split(), *args[1:])
        return [pack_command(args)]


async def pipelined(client: aioredis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """The raw replies of ``commands``, sent in one round trip (a pipeline without MULTI).

    What redis-py's pipeline does for the hot path's commands (the same bytes out, the same
    replies, retried on a connection error by the client's own ``Retry``, the first error reply
    raised once every reply is read), without its machinery per reply: a timeout context,
    callbacks, metrics, 15-25 µs of CPU a command (``benchmarks/bench_io.py``). Replies are as hiredis
    parses them, without redis-py's callbacks: ``HGETALL`` gives a dict in RESP3 (redis-py's
    default) but a flat list in RESP2 (see :func:`hash_reply`). A client whose connections do not
    parse with hiredis goes through redis-py's pipeline."""
    if not commands:
        return []
    pool = client.connection_pool
    conn = await pool.get_connection()
    if not isinstance(conn._parser, _AsyncHiredisParser):  # not hiredis: redis-py's own way
        await pool.release(conn)
        return await _redis_py_pipeline(client, commands)
    try:
        packed = b"".join([pack_command(command) for command in commands])

        async def exchange() -> list[Any]:
            if not conn.is_connected:  # as redis-py's send connects (its errors, its retries)
                await conn.connect_check_health(check_health=False)
            conn._writer.write(packed)
            await _drained(conn)
            return await _read_replies(conn, len(commands))

        replies = await conn.retry.call_with_retry(exchange, lambda error: conn.disconnect())
    finally:
        await pool.release(conn)
    return _raise_first_error(replies, commands)


class StreamedPipeline:
    """A pipeline whose commands leave as they are added, ``flush_every`` at a time, so that Redis
    runs the first ones while the caller computes the next (on a 2-core machine the two overlap);
    :meth:`replies` then reads them all. Replies as :func:`pipelined` gives them.

    ``async with StreamedPipeline(client) as pipe:``, ``pipe.add(command)`` for each, then
    ``await pipe.replies()``. Nothing is retried (some commands may have run): a connection error
    fails the whole, as does an error before :meth:`replies`; the connection is then closed, never
    handed back with replies unread.
    """

    def __init__(self, client: aioredis.Redis, flush_every: int = 8) -> None:
        self.client, self.flush_every = client, flush_every
        self.commands: list[tuple[Any, ...]] = []
        self._packed: list[bytes] = []
        self._conn: Any = None
        self._read = True  # every reply read (nothing sent yet)

    async def __aenter__(self) -> StreamedPipeline:
        conn = await self.client.connection_pool.get_connection()
        if isinstance(conn._parser, _AsyncHiredisParser):
            self._conn = conn
        else:  # not hiredis: collected, then sent through redis-py's pipeline
            await self.client.connection_pool.release(conn)
        return self

    def add(self, command: tuple[Any, ...]) -> None:
        self.commands.append(command)
        if self._conn is not None:
            self._packed.append(pack_command(command))
            if len(self._packed) >= self.flush_every:
                self._flush()

    def _flush(self) -> None:
        if self._packed:
            self._read = False
            self._conn._writer.write(b"".join(self._packed))  # buffered by the transport: never blocks
            self._packed.clear()

    async def replies(self) -> list[Any]:
        if self._conn is None:
            return await _redis_py_pipeline(self.client, self.commands) if self.commands else []
        self._flush()
        if self._read:
            return []
        await _drained(self._conn)
        replies = await _read_replies(self._conn, len(self.commands))
        self._read = True
        return _raise_first_error(replies, self.commands)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            if not self._read:  # replies left unread: the connection is out of step
                await self._conn.disconnect(nowait=True)
            await self.client.connection_pool.release(self._conn)


def hash_reply(reply: dict[bytes, bytes] | list[bytes]) -> dict[bytes, bytes]:
    """An ``HGETALL`` reply of :func:`pipelined` as a dict, whichever protocol the client speaks.

    >>> hash_reply([b"a", b"1", b"b", b"2"]), hash_reply({b"a": b"1"}), hash_reply([])
    ({b'a': b'1', b'b': b'2'}, {b'a': b'1'}, {})
    """
    return reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2]))


async def _redis_py_pipeline(client: aioredis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return await pipe.execute()


def _raise_first_error(replies: list[Any], commands: list[tuple[Any, ...]]) -> list[Any]:
    """``replies``, or the first error among them raised, naming its command as redis-py does."""
    for i, reply in enumerate(replies):
        if isinstance(reply, ResponseError):
            reply.args = (f"Command # {i + 1} ({str(commands[i][0])[:20]} ...) of pipeline caused error: "
                          f"{reply.args[0] if reply.args else ''}", *reply.args[1:])
            raise reply
    return replies


async def _drained(conn: Any) -> None:
    """Wait until ``conn``'s transport took what was written, within the socket timeout; a failure
    closes the connection and raises as redis-py does. Written straight to the transport, not through
    redis-py's ``send_packed_command`` (its health check, type checks and, with a socket timeout, a
    task of its own per send): a one-command round trip 79.6 -> 64.3 µs of CPU (uvloop, alternated)."""
    try:
        async with asyncio.timeout(conn.socket_timeout):
            await conn._writer.drain()
    except BaseException as exc:
        await conn.disconnect(nowait=True)
        raise _as_redis_error(exc, conn, "writing to") from None


async def _read_replies(conn: Any, n: int) -> list[Any]:
    """Read ``n`` replies from ``conn`` (error replies as ResponseError objects). A connection that
    fails or times out midway is closed, never handed back out of step."""
    reader, stream, push = conn._parser._reader, conn._reader, conn._parser._hiredis_PushNotificationType
    replies: list[Any] = []
    try:
        async with asyncio.timeout(conn.socket_timeout):  # None: wait as long as it takes
            while len(replies) < n:
                reply = reader.gets()
                if reply is NOT_ENOUGH_DATA:
                    data = await stream.read(65_536)
                    if not data:
                        raise RedisConnectionError("Connection closed by server.")
                    reader.feed(data)
                    continue
                if isinstance(reply, RedisConnectionError):  # e.g. LOADING: as redis-py raises it
                    raise reply
                if push is not None and isinstance(reply, push):  # RESP3 out of band: not a reply
                    await conn._parser.handle_push_response(reply)
                    continue
                replies.append(reply)
    except BaseException as exc:
        await conn.disconnect(nowait=True)
        raise _as_redis_error(exc, conn, "reading from") from None
    return replies


def _as_redis_error(exc: BaseException, conn: Any, doing: str) -> BaseException:
    """Socket errors and timeouts as redis-py raises them (what the worker's retry expects)."""
    if isinstance(exc, TimeoutError):  # before OSError: a TimeoutError is one
        return RedisTimeoutError(f"Timeout {doing} {conn._host_error()}")  # host:port, or a socket's path
    if isinstance(exc, OSError):
        return RedisConnectionError(f"Error {doing} {conn._host_error()}: {exc}")
    return exc


@functools.cache
def _hiredis_packing(connection_class: type) -> type:
    return type(f"Hiredis{connection_class.__name__}", (HiredisPacking, connection_class), {})


def redis_sync_client(settings: Settings, url: str | None = None, **extra: Any) -> redis.Redis:
    """The blocking variant of :func:`redis_client` (for probes and scripts)."""
    return redis.Redis.from_url(url or settings.redis_url, **redis_kwargs(settings), **extra)


# ---------------------------------------------------------------------------------------------- preflight


async def check_kafka(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Log in to the first reachable bootstrap server as every client will, or raise
    :class:`ConnectionCheckError` naming the setting that is wrong.

    aiokafka's own bootstrap logs such errors and retries; this check surfaces them once.
    """
    kw = kafka_kwargs(settings)
    kw.pop("bootstrap_servers")
    errors = []
    for hostport in settings.kafka_bootstrap.split(","):
        host, _, port = hostport.rpartition(":")
        try:
            conn = await asyncio.wait_for(create_conn(host.strip("[]"), int(port), request_timeout_ms=5000, **kw),
                                          timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure is explained below
            errors.append((hostport, exc))
            continue
        conn.close()
        return
    raise ConnectionCheckError(explain_kafka_error(settings, *errors[0]))


def explain_kafka_error(settings: Settings, hostport: str, exc: BaseException) -> str:
    """One line: what failed and which setting to look at."""
    where = f"Kafka at {hostport} (LEADSTREAM_KAFKA)"
    proto = f"LEADSTREAM_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}"
    if isinstance(exc, SaslAuthenticationFailed | IllegalSaslStateError):
        return (f"{where} refused the SASL login of user {settings.kafka_sasl_username!r} with "
                f"{settings.kafka_sasl_mechanism}: check LEADSTREAM_KAFKA_SASL_USERNAME and "
                f"LEADSTREAM_KAFKA_SASL_PASSWORD (or _FILE) [{_short(exc)}]")
    if isinstance(exc, UnsupportedSaslMechanismError):
        return (f"{where} does not accept LEADSTREAM_KAFKA_SASL_MECHANISM={settings.kafka_sasl_mechanism} "
                f"[{_short(exc)}]")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"{where}: its TLS certificate is not trusted: check LEADSTREAM_KAFKA_SSL_CAFILE "
                f"(now {settings.kafka_ssl_cafile or 'the system CAs'}) [{_short(exc)}]")
    if isinstance(exc, ssl.SSLError):
        return f"{where}: the TLS handshake failed: does the listener expect {proto}? [{_short(exc)}]"
    if isinstance(exc, asyncio.TimeoutError) or "timeout" in type(exc).__name__.lower():
        return f"{where} did not answer within {CHECK_TIMEOUT_S:.0f} s: does the listener expect {proto}?"
    if isinstance(exc, ConnectionError | OSError):
        return f"{where} is unreachable: {_short(exc)}; is it running? (`leadstream up` starts a local one)"
    if isinstance(exc, KafkaError):
        # e.g. a PLAINTEXT client on a TLS listener: the broker just closes the connection.
        return f"{where}: {_short(exc)}: does the listener expect {proto} and these LEADSTREAM_KAFKA_SASL_* settings?"
    return f"{where}: {_short(exc)}"


async def check_redis(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """PING Redis with the configured credentials, or raise :class:`ConnectionCheckError` naming the setting."""
    client = redis_client(settings, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    where = f"Redis at {redact_url(settings.redis_url)} (LEADSTREAM_REDIS)"
    try:
        await client.ping()
    except redis.AuthenticationError as exc:
        raise ConnectionCheckError(f"{where} refused the login: check the user and password in LEADSTREAM_REDIS "
                                   f"or LEADSTREAM_REDIS_PASSWORD (or _FILE) [{_short(exc)}]") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc) or "NOPERM" in str(exc):
            raise ConnectionCheckError(f"{where} requires a password or an ACL permission: set it in "
                                       f"LEADSTREAM_REDIS or LEADSTREAM_REDIS_PASSWORD (or _FILE) "
                                       f"[{_short(exc)}]") from None
        raise ConnectionCheckError(f"{where}: {_short(exc)}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        hint = (" check LEADSTREAM_REDIS_SSL_CAFILE and the rediss:// scheme;" if "SSL" in str(exc)
                or "certificate" in str(exc) else "")
        raise ConnectionCheckError(f"{where} is unreachable:{hint} {_short(exc)}") from None
    finally:
        await client.aclose()


async def check_connections(settings: Settings) -> None:
    """Both checks; the first failure is raised."""
    await check_kafka(settings)
    await check_redis(settings)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


async def redis_readiness(client: Any) -> str:
    """``ok``, or why Redis does not answer (for ``/readyz`` of the worker and the api)."""
    try:
        await asyncio.wait_for(client.ping(), 2.0)
        return "ok"
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        return f"unreachable: {exc!r}"
