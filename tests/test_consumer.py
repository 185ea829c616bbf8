"""The scoring loop's settle-and-commit rules, with a fake consumer (the real one runs in
tests/integration: kill -9, rebalance and broker-restart drills)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaTimeoutError

from streams.consumer import Batch, OutputsNotAcknowledged, ScoringLoop, _SettleOnRevoke
from streams.settings import Settings

TP = TopicPartition("web", 0)


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.gate: asyncio.Event | None = None  # set: commits wait for it (a slow or hanging broker)

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.commits.append(dict(offsets))


class FakePipeline:
    def __init__(self) -> None:
        self.acked: list[object] = []
        self.flushed = 0
        self.forgotten = 0
        self.counts: dict[str, int] = {}

    def acknowledged(self, material: list[object]) -> None:
        self.acked += material

    async def flush_acked(self) -> None:
        self.flushed += 1

    def forget_written(self) -> None:
        self.forgotten += 1


def loop_with(pipeline: FakePipeline) -> tuple[ScoringLoop, FakeConsumer]:
    async def send(outs):  # not used: batches are put in flight by hand
        return []

    async def crash(exc):
        raise AssertionError(exc)

    loop = ScoringLoop(Settings.from_env({}), pipeline, send, on_crash=crash)  # type: ignore[arg-type]
    loop.consumer = FakeConsumer()  # type: ignore[assignment]
    return loop, loop.consumer  # type: ignore[return-value]


def batch(ack: asyncio.Future, next_offset: int, material: str) -> Batch:
    return Batch([ack], {TP: next_offset}, [(material, ["web/0/1"])], [], [], 0.0)


async def test_offsets_are_committed_only_after_the_acks_and_the_clean_up() -> None:
    pipeline = FakePipeline()
    loop, consumer = loop_with(pipeline)
    first, second = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
    loop._in_flight.extend([batch(first, 10, "l1"), batch(second, 20, "l2")])
    settling = asyncio.create_task(loop._settle(keep=1))
    await asyncio.sleep(0.01)
    assert consumer.commits == [] and not settling.done()  # the first batch's outputs are not acked yet
    first.set_result(None)
    await settling
    await loop.drain_commits()
    assert consumer.commits == [{TP: 10}] and pipeline.flushed == 1 and pipeline.acked == [("l1", ["web/0/1"])]
    assert len(loop._in_flight) == 1  # the newest batch stays in flight while the next is computed
    second.set_result(None)
    await loop._settle(keep=0)
    await loop.drain_commits()
    assert consumer.commits == [{TP: 10}, {TP: 20}]


async def test_commits_come_at_most_every_commit_interval_and_drain_commits_the_rest() -> None:
    """At a few events per batch a commit per batch cost more than the events: acknowledged offsets
    wait for LEADSTREAM_COMMIT_EVERY_SECONDS; a rebalance or a stop commits them at once."""
    pipeline = FakePipeline()
    loop, consumer = loop_with(pipeline)
    loop.settings = Settings.from_env({"LEADSTREAM_COMMIT_EVERY_SECONDS": "0.2"})
    for offset in (10, 20, 30):
        ack = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        loop._in_flight.append(batch(ack, offset, f"l{offset}"))
        await loop._settle(keep=0)
        await asyncio.sleep(0.01)
    assert consumer.commits == [{TP: 10}]  # the first at once; the next two within the interval wait
    await asyncio.sleep(0.25)
    await loop._settle(keep=0)  # the loop's idle turn: the interval has passed
    await asyncio.sleep(0.01)
    assert consumer.commits == [{TP: 10}, {TP: 30}] and pipeline.flushed == 2
    ack = asyncio.get_running_loop().create_future()
    ack.set_result(None)
    loop._in_flight.append(batch(ack, 40, "l40"))
    await loop._settle(keep=0)
    assert consumer.commits[-1] == {TP: 30}
    await loop.drain_commits()  # before partitions move: no waiting for the interval
    assert consumer.commits[-1] == {TP: 40} and loop._to_commit == {}


class Fetches:
    """getmany answering from a script: each call the next dict (then nothing), with its arguments kept."""

    def __init__(self, *answers: dict[TopicPartition, list[int]]) -> None:
        self.answers, self.calls = list(answers), []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[int]]:
        self.calls.append((timeout_ms, max_records))
        return self.answers.pop(0) if self.answers else {}


@pytest.mark.parametrize("linger", ["0", "0.01"])
async def test_a_small_batch_lingers_for_more_input_in_partition_order(linger: str) -> None:
    loop, _ = loop_with(FakePipeline())
    loop.settings = Settings.from_env({"LEADSTREAM_BATCH_LINGER_SECONDS": linger, "LEADSTREAM_BATCH_MAX_EVENTS": "5"})
    other = TopicPartition("crm", 3)
    loop.consumer = Fetches({TP: [1, 2]}, {TP: [3], other: [7, 8]})  # type: ignore[assignment]
    fetched = await loop._fetch(wait_ms=5)
    if linger == "0":  # no wait: the batch is what was there
        assert fetched == {TP: [1, 2]} and loop.consumer.calls == [(5, 5)]
    else:  # one more look, for at most the room left, without blocking
        assert fetched == {TP: [1, 2, 3], other: [7, 8]} and loop.consumer.calls == [(5, 5), (0, 3)]
    full = Fetches({TP: [1, 2, 3, 4, 5]})
    loop.consumer = full  # type: ignore[assignment]
    assert await loop._fetch(wait_ms=5) == {TP: [1, 2, 3, 4, 5]} and len(full.calls) == 1  # full: no wait


async def test_the_loop_goes_on_while_a_commit_is_under_way() -> None:
    """A slow commit does not hold the next batches; what they acknowledge meanwhile goes in one commit."""
    pipeline = FakePipeline()
    loop, consumer = loop_with(pipeline)
    consumer.gate = asyncio.Event()
    for offset in (10, 20, 30):
        ack = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        loop._in_flight.append(batch(ack, offset, f"l{offset}"))
        await asyncio.wait_for(loop._settle(keep=0), 1.0)  # returns although the first commit waits
    assert consumer.commits == []
    consumer.gate.set()
    await loop.drain_commits()
    assert consumer.commits == [{TP: 10}, {TP: 30}]
    assert pipeline.flushed == 2  # the material of acknowledged batches dropped before each commit


async def test_a_hanging_commit_does_not_hold_a_rebalance() -> None:
    pipeline = FakePipeline()
    loop, consumer = loop_with(pipeline)
    consumer.gate = asyncio.Event()  # never set: the broker does not answer
    ack = asyncio.get_running_loop().create_future()
    ack.set_result(None)
    loop._in_flight.append(batch(ack, 10, "l1"))
    await loop._settle(keep=0)
    await asyncio.wait_for(loop.drain_commits(timeout_s=0.05), 1.0)
    assert consumer.commits == [] and loop._to_commit == {TP: 10}  # left for a later try or the next owner
    consumer.gate.set()  # the broker answers again: the next drain commits what was left
    await asyncio.wait_for(loop.drain_commits(timeout_s=1.0), 2.0)
    assert consumer.commits == [{TP: 10}] and loop._to_commit == {}


async def test_refused_outputs_stop_the_loop_without_committing() -> None:
    pipeline = FakePipeline()
    loop, consumer = loop_with(pipeline)
    refused = asyncio.get_running_loop().create_future()
    refused.set_exception(KafkaTimeoutError())
    loop._in_flight.append(batch(refused, 10, "l1"))
    with pytest.raises(OutputsNotAcknowledged):
        await loop._settle(keep=0)
    assert consumer.commits == [] and pipeline.acked == []  # redelivered after the restart, re-sent from Redis


async def test_a_revoke_commits_what_was_acknowledged_and_forgets_the_leads_written() -> None:
    pipeline = FakePipeline()
    loop, consumer = loop_with(pipeline)
    ack = asyncio.get_running_loop().create_future()
    ack.set_result(None)
    loop._in_flight.append(batch(ack, 10, "l1"))
    await _SettleOnRevoke(loop).on_partitions_revoked({TP})
    # The next owner writes these leads: a lead kept as last written here would be stale.
    assert consumer.commits == [{TP: 10}] and pipeline.forgotten == 1 and pipeline.flushed == 1
