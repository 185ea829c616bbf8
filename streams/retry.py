"""Retrying through Redis outages and lead contention: a message is never skipped because of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams import metrics
from streams.pipeline import ContentionError

log = logging.getLogger(__name__)
T = TypeVar("T")


async def with_retry(attempt: Callable[[], Awaitable[T]], what: str, max_backoff_s: float = 30.0) -> T:
    """Run ``attempt`` until it gets through Redis outages and lead contention: a message is never
    skipped because of them (no data lost); the partition waits instead."""
    backoff = 0.1
    while True:
        try:
            return await attempt()
        except (RedisConnectionError, RedisTimeoutError, ContentionError) as exc:
            metrics.observe_retry(redis_error=not isinstance(exc, ContentionError))
            log.warning("%s: %r; retrying in %.1f s", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, max_backoff_s)
