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
])
def test_a_bad_value_names_the_variable_and_the_expected_form(env, value, expected):
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({env: value})
    assert str(exc.value).startswith(f"{env}={value!r}: ") and expected in str(exc.value)


def test_cli_reports_a_bad_setting_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("LEADSTREAM_KAFKA", "nope")
    assert main(["settings"]) == 2
    assert capsys.readouterr().err.startswith("leadstream: bad setting: LEADSTREAM_KAFKA='nope'")


def test_every_setting_is_documented():
    text = describe()
    assert all(s.env in text and s.doc for s in SETTINGS.values())
    assert all(s.env.startswith("LEADSTREAM_") for s in SETTINGS.values())
