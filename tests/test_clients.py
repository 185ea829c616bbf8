"""Client settings: one helper gives every Kafka and Redis client the same protocol, SASL and TLS."""

import ssl
import subprocess

import faust
import pytest

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
