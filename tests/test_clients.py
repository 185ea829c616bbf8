"""Client settings: one helper gives every Kafka and Redis client the same protocol, SASL and TLS."""

import asyncio
import ssl
import subprocess

import faust
import pytest
import redis.asyncio as aioredis

from streams.clients import faust_credentials, kafka_kwargs, redis_kwargs
from streams.settings import Settings


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory):
    """A self-signed CA certificate (PEM), made with openssl."""
    d = tmp_path_factory.mktemp("ca")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                    "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem")], check=True, capture_output=True)
    return d / "ca.pem"


def test_plaintext_is_the_default_and_has_no_tls_or_sasl():
    s = Settings.from_env({})
    assert kafka_kwargs(s) == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(s) is None and redis_kwargs(s) == {}


def test_sasl_ssl_gives_every_client_the_same_login_and_ca(ca_file):
    s = Settings.from_env({"LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "LEADSTREAM_KAFKA_SASL_USERNAME": "u",
                           "LEADSTREAM_KAFKA_SASL_PASSWORD": "p", "LEADSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
                           "LEADSTREAM_KAFKA_SSL_CAFILE": str(ca_file)})
    kw = kafka_kwargs(s)
    assert (kw["security_protocol"], kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == (
        "SASL_SSL", "SCRAM-SHA-256", "u", "p")
    ctx = kw["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "test-ca"),),)]
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == (
        "SASL_SSL", "SCRAM-SHA-256", "u", "p")
    assert "password" not in repr(creds)


def test_ssl_without_sasl_uses_tls_credentials(ca_file):
    s = Settings.from_env({"LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "LEADSTREAM_KAFKA_SSL_CAFILE": str(ca_file)})
    assert "sasl_mechanism" not in kafka_kwargs(s)
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SSLCredentials) and creds.protocol.value == "SSL"


def test_redis_password_and_ca_go_to_the_client(ca_file):
    s = Settings.from_env({"LEADSTREAM_REDIS": "rediss://scorer@redis.internal:6380/0",
                           "LEADSTREAM_REDIS_PASSWORD": "pw", "LEADSTREAM_REDIS_SSL_CAFILE": str(ca_file)})
    assert redis_kwargs(s) == {"password": "pw", "ssl_ca_certs": str(ca_file)}


def test_commands_are_packed_as_redis_py_packs_them():
    """The C packer sends the bytes redis-py's own Python packer would, whatever the argument types."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from streams.clients import _hiredis_packing

    ours, theirs = _hiredis_packing(Connection)(), Connection()
    for args in [("EVALSHA", "a" * 40, 2, "lead:{03}:x", "view:{03}:lb", "3", "", b"\x00" * 7000, 1.5, -2),
                 ("CONFIG GET", "maxmemory"), ("HSET", "k", "f", bytearray(b"ids")), ("SET", "k", memoryview(b"v")),
                 ("SET", "k", "ünïcode"), ("ZADD", "z", 0.1 + 0.2, "m", 1e-7, "n", 2 ** 70, "o")]:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args
    for bad in (True, None, object()):
        try:
            ours.pack_command("SET", "k", bad)
        except DataError:
            continue
        raise AssertionError(f"{bad!r} was packed")


def test_the_memoised_partitioner_puts_every_key_where_kafkas_default_does() -> None:
    import random

    from aiokafka.partitioner import DefaultPartitioner

    from streams.clients import KeyPartitioner

    rng, ours, default = random.Random(2), KeyPartitioner(), DefaultPartitioner()
    for _ in range(2000):
        key = rng.randbytes(rng.randint(0, 40))
        partitions = list(range(rng.randint(1, 64)))
        assert ours(key, partitions, partitions) == ours(key, partitions, []) == default(key, partitions, partitions)
    assert ours(None, [0, 1, 2], [1]) == 1  # no key: a random available partition, as the default


# ---- one round trip without redis-py's machinery per reply (real Redis) ------------------------------


@pytest.mark.integration
async def test_pipelined_replies_are_redis_pys_replies(redis_client, stack):
    """The same commands through redis-py's pipeline and ours: the same replies, in order, on one
    connection of the client's pool (HGETALL through :func:`hash_reply`, in both protocols)."""
    from streams.clients import hash_reply, pipelined

    from streams import clients
    from tests.conftest import redis_test_url

    await redis_client.hset("h", mapping={"a": "1", "b": b"\x00\xff"})
    await redis_client.set("s", "x" * 70_000)  # more than one socket read
    sha = await redis_client.script_load("return {KEYS[1], ARGV[1]}")
    commands = [("HMGET", "h", "a", "zz", "b"), ("HGETALL", "h"), ("GET", "nope"), ("GET", "s"),
                ("EVALSHA", sha, 1, "k", b"\x00v"), ("HDEL", "h", "zz"), ("HGETALL", "nope")]
    pipe = redis_client.pipeline(transaction=False)
    for c in commands:
        pipe.execute_command(*c)
    theirs = await pipe.execute()
    ours = await pipelined(redis_client, commands)
    assert hash_reply(ours[1]) == theirs[1] == {b"a": b"1", b"b": b"\x00\xff"}
    assert hash_reply(ours[6]) == theirs[6] == {}
    assert ours[:1] + ours[2:6] == theirs[:1] + theirs[2:6] and ours[3] == b"x" * 70_000
    resp2 = clients.redis_client(stack, redis_test_url(stack.redis_url), protocol=2)
    try:
        flat = await pipelined(resp2, [("HGETALL", "h"), ("HGETALL", "nope")])
        assert isinstance(flat[0], list) and [hash_reply(r) for r in flat] == [theirs[1], {}]
    finally:
        await resp2.aclose()
    assert await pipelined(redis_client, []) == []


@pytest.mark.integration
async def test_pipelined_raises_the_first_error_after_reading_every_reply(redis_client):
    """An error reply (an unknown script) raises redis-py's exception class, naming the command; the
    replies after it were read, so the connection serves the next call in step."""
    from redis.exceptions import NoScriptError, ResponseError

    from streams.clients import pipelined

    with pytest.raises(NoScriptError, match=r"Command # 2 \(EVALSHA"):
        await pipelined(redis_client, [("SET", "a", "1"), ("EVALSHA", "0" * 40, 0), ("INCR", "a"), ("HSET", "a", "f", "v")])
    assert await redis_client.get("a") == b"2"  # the commands after the error ran, as in a pipeline
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipelined(redis_client, [("HSET", "a", "f", "v")])
    assert await pipelined(redis_client, [("GET", "a"), ("PING",)]) == [b"2", b"PONG"]


@pytest.mark.integration
async def test_pipelined_closes_a_connection_that_timed_out_and_reconnects_after_a_kill(stack):
    """A reply that does not come within the socket timeout raises redis' TimeoutError and closes the
    connection (its late reply is never read as the next call's); a connection the server killed
    fails the call (a redis ConnectionError, which the worker's retry handles, as with redis-py's
    pipeline) or is replaced when the pool finds it closed; the next call runs on a new connection."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from streams.clients import pipelined, redis_client as make_client
    from tests.conftest import redis_test_url

    url = redis_test_url(stack.redis_url)
    client, killer = make_client(stack, url, socket_timeout=0.2), make_client(stack, url)
    try:
        await client.delete("q")
        with pytest.raises(RedisTimeoutError):
            await pipelined(client, [("PING",), ("BLPOP", "q", 1), ("PING",)])
        await killer.rpush("q", "late")
        assert await pipelined(client, [("ECHO", "next")]) == [b"next"]
        assert await client.lpop("q") == b"late"  # the timed-out BLPOP never took it on a closed connection
        own_id = (await pipelined(client, [("CLIENT", "ID")]))[0]
        assert await killer.execute_command("CLIENT", "KILL", "ID", own_id) == 1
        try:
            assert await pipelined(client, [("ECHO", "again")]) == [b"again"]
        except RedisConnectionError:
            pass
        assert await pipelined(client, [("ECHO", "again")]) == [b"again"]
        assert (await pipelined(client, [("CLIENT", "ID")]))[0] != own_id
    finally:
        await client.aclose()
        await killer.aclose()


@pytest.mark.integration
async def test_a_streamed_pipeline_sends_before_its_replies_are_read(stack, redis_client):
    """Commands reach Redis as they are added (the overlap the write path counts on); replies come
    in order at the end; leaving with replies unread closes the connection (the next call is in
    step); a client without hiredis gets redis-py's pipeline, the same replies."""
    from redis.asyncio.connection import Connection
    from redis._parsers import _AsyncRESP3Parser

    from streams.clients import StreamedPipeline, pipelined, redis_client as make_client
    from tests.conftest import redis_test_url

    async with StreamedPipeline(redis_client, flush_every=1) as pipe:
        pipe.add(("SET", "a", "1"))
        await asyncio.sleep(0.05)
        other = make_client(stack, redis_test_url(stack.redis_url))
        assert await other.get("a") == b"1"  # ran before replies() was called
        await other.aclose()
        pipe.add(("INCR", "a"))
        pipe.add(("GET", "a"))
        assert await pipe.replies() == [b"OK", 2, b"2"]
    with pytest.raises(RuntimeError):
        async with StreamedPipeline(redis_client, flush_every=1) as pipe:
            pipe.add(("BLPOP", "q", 0.3))
            raise RuntimeError("the caller failed between add and replies")
    assert await pipelined(redis_client, [("ECHO", "y")]) == [b"y"]

    plain = aioredis.Redis.from_url(redis_test_url(stack.redis_url), connection_class=Connection,
                                    parser_class=_AsyncRESP3Parser)
    try:
        async with StreamedPipeline(plain) as pipe:
            pipe.add(("INCR", "a"))
            pipe.add(("HSET", "h", "f", "v"))
            assert await pipe.replies() == [3, 1]
        assert await pipelined(plain, [("GET", "a")]) == [b"3"]
    finally:
        await plain.aclose()
