"""Tests against the real Kafka broker and Redis server (see the ``stack`` fixture in tests/conftest.py)."""
