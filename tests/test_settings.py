"""Settings: defaults, every variable parsed, and bad values named with the expected form."""

import pytest

from streams.cli import main
from streams.settings import SETTINGS, Settings, SettingsError, describe


def test_defaults_work_without_any_variable():
    s = Settings.from_env({})
    assert (s.kafka_bootstrap, s.redis_url, s.topic_scores, s.partitions) == (
        "127.0.0.1:9092", "redis://127.0.0.1:6379/0", "leads.scores", 8)
    assert s.scoring_config.is_file()


@pytest.mark.parametrize("env,value,expected", [
    ("LEADSTREAM_KAFKA", "localhost", "expected host:port[,host:port...]"),
    ("LEADSTREAM_REDIS", "http://x", "expected a Redis URL"),
    ("LEADSTREAM_TOPIC_SCORES", "bad topic!", "expected a Kafka topic name"),
    ("LEADSTREAM_PARTITIONS", "0", "expected a whole number >= 1"),
    ("LEADSTREAM_WEB_PORT", "http", "expected a whole number >= 1"),
    ("LEADSTREAM_SCORING_CONFIG", "/nonexistent.toml", "expected the path of an existing scoring config"),
    ("LEADSTREAM_MODEL_POLL_SECONDS", "-1", "expected a number > 0"),
    ("LEADSTREAM_MAX_EVENT_BYTES", "10", "expected a whole number >= 256"),
    ("LEADSTREAM_EVENT_LOOP", "tokio", "expected one of uvloop, asyncio"),
    ("LEADSTREAM_TRAINER_NICE", "20", "expected a Unix nice value, a whole number from 0"),
    ("LEADSTREAM_TRAINER_NICE", "-5", "expected a Unix nice value, a whole number from 0"),
])
def test_a_bad_value_names_the_variable_and_the_expected_form(env, value, expected):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({env: value})
    assert str(exc.value).startswith(f"{env}={value!r}: ") and expected in str(exc.value)


def test_cli_reports_a_bad_setting_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("LEADSTREAM_KAFKA", "nope")
    assert main(["settings"]) == 2
    assert capsys.readouterr().err.startswith("leadstream: bad setting: LEADSTREAM_KAFKA='nope'")


@pytest.mark.parametrize("pairs", ["0", "two"])
def test_bench_rejects_a_bad_number_of_pairs_naming_the_option(pairs, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "burst", "--pairs", pairs])
    assert exc.value.code == 2
    assert f"argument --pairs: {pairs!r}: expected a whole number >= 1" in capsys.readouterr().err


def test_every_setting_is_documented():
    text = describe()
    assert all(s.env in text and s.doc for s in SETTINGS.values())
    assert all(s.env.startswith("LEADSTREAM_") for s in SETTINGS.values())


SASL = {"LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "LEADSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "LEADSTREAM_KAFKA_SASL_USERNAME": "scorer"}


def test_security_settings_are_parsed_and_secrets_read_from_files(tmp_path):
    secret = tmp_path / "kafka-password"
    secret.write_text("s3cret-from-file\n")  # a mounted secret usually ends with a newline
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = Settings.from_env(SASL | {"LEADSTREAM_KAFKA_SASL_PASSWORD_FILE": str(secret),
                                  "LEADSTREAM_KAFKA_SSL_CAFILE": str(ca)})
    assert (s.kafka_security_protocol, s.kafka_sasl_mechanism, s.kafka_sasl_username) == (
        "SASL_SSL", "SCRAM-SHA-256", "scorer")
    assert s.kafka_sasl_password.reveal() == "s3cret-from-file" and s.kafka_ssl_cafile == ca
    assert s.kafka_ssl_certfile is None and not s.redis_password
    assert "s3cret" not in repr(s) and "s3cret" not in str(s)


@pytest.mark.parametrize("env,expected", [
    ({"LEADSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "LEADSTREAM_KAFKA_SECURITY_PROTOCOL='TLS': expected one of "
                                                    "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
    ({"LEADSTREAM_KAFKA_SASL_MECHANISM": "GSSAPI"}, "expected one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"),
    (SASL, "LEADSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs LEADSTREAM_KAFKA_SASL_USERNAME and "
           "LEADSTREAM_KAFKA_SASL_PASSWORD"),
    ({"LEADSTREAM_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "LEADSTREAM_KAFKA_SSL_CAFILE='/nonexistent/ca.pem': "
                                                             "expected the path of an existing, readable file"),
    ({"LEADSTREAM_REDIS_PASSWORD_FILE": "/nonexistent/pw"}, "LEADSTREAM_REDIS_PASSWORD_FILE='/nonexistent/pw': "
                                                            "expected a readable file"),
    ({"LEADSTREAM_REDIS_PASSWORD": "a", "LEADSTREAM_REDIS_PASSWORD_FILE": "/etc/hostname"},
     "LEADSTREAM_REDIS_PASSWORD and LEADSTREAM_REDIS_PASSWORD_FILE are both set"),
    ({"LEADSTREAM_REDIS": "redis://:pw@127.0.0.1:6379/0", "LEADSTREAM_REDIS_PASSWORD": "pw"},
     "expected the password in one place only"),
    ({"LEADSTREAM_REDIS": "ftp://user:hunter2@host/0"}, "LEADSTREAM_REDIS='ftp://user:***@host/0': expected a Redis URL"),
    ({"LEADSTREAM_MAX_FUTURE_SKEW_SECONDS": "0"}, "LEADSTREAM_MAX_FUTURE_SKEW_SECONDS='0': expected a whole number >= 1"),
])
def test_bad_security_settings_name_the_variable(env, expected):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(env)
    assert expected in str(exc.value) and "hunter2" not in str(exc.value)


def test_settings_command_masks_secrets(monkeypatch, capsys):
    monkeypatch.setenv("LEADSTREAM_REDIS", "redis://app:hunter2@127.0.0.1:6379/0")
    monkeypatch.setenv("LEADSTREAM_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("LEADSTREAM_KAFKA_SASL_USERNAME", "scorer")
    monkeypatch.setenv("LEADSTREAM_KAFKA_SASL_PASSWORD", "correct-horse")
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "correct-horse" not in out
    assert "now 'redis://app:***@127.0.0.1:6379/0'" in out
    assert "LEADSTREAM_KAFKA_SASL_PASSWORD" in out and "now ***" in out and "now 'scorer'" in out


def test_to_env_round_trips_every_setting_secrets_included(tmp_path):
    s = Settings.from_env(SASL | {"LEADSTREAM_KAFKA_SASL_PASSWORD": "pw", "LEADSTREAM_PARTITIONS": "3"})
    assert Settings.from_env(s.to_env()) == s


def test_java_home_is_leadstreams_setting_or_javas_own_variable(tmp_path) -> None:
    assert Settings.from_env({}).java_home is None  # then `java` on the PATH
    assert Settings.from_env({"JAVA_HOME": str(tmp_path)}).java_home == tmp_path
    ours = tmp_path / "jdk"
    assert Settings.from_env({"JAVA_HOME": str(tmp_path), "LEADSTREAM_JAVA_HOME": str(ours)}).java_home == ours
