"""The rescoring timer's chunks: written and handed to the producer in order, acknowledged out of the lock."""

from __future__ import annotations

import asyncio
from typing import Any

from streams.pipeline import EventPipeline, Out
from streams.rescoring import RESCORE_CHUNK, RESCORE_CHUNK_BUSY, Rescorer
from streams.settings import Settings


class Pipeline:
    """The pipeline's rescoring side as the timer sees it: one record per lead, in the order asked;
    its chunking (with the next chunk's prefetch) is EventPipeline's own."""

    rescore_chunks = EventPipeline.rescore_chunks

    def __init__(self) -> None:
        self.send_order = asyncio.Lock()
        self.chunks: list[list[str]] = []
        self.prefetched: list[list[str]] = []
        self.asked_before: list[int] = []

    def _prefetch(self, leads: list[str]) -> asyncio.Future[list[str]]:
        self.prefetched.append(leads)
        loaded = asyncio.get_running_loop().create_future()
        loaded.set_result(leads)
        return loaded

    async def rescore_leads(self, leads: list[str], trigger: str, now_ms: int, *, loaded: Any) -> list[Out]:
        assert self.send_order.locked()  # written under the lock the event batches take too
        assert await loaded == leads == self.prefetched[len(self.chunks)]  # this chunk's own prefetch
        self.asked_before.append(len(self.prefetched))  # chunks whose load had left by this one's compute
        self.chunks.append(leads)
        await asyncio.sleep(0)
        return [Out("scores", lead.encode(), trigger.encode()) for lead in leads]


class Sender:
    """A producer whose acknowledgements come only when the test says so."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.enqueued: list[bytes | None] = []
        self.acks: list[asyncio.Future[Any]] = []

    async def enqueue(self, outs: list[Out]) -> list[asyncio.Future[Any]]:
        assert self.pipeline.send_order.locked()  # handed over before another write can slip in
        self.enqueued += [o.key for o in outs]
        futures = [asyncio.get_running_loop().create_future() for _ in outs]
        self.acks += futures
        return futures


async def until(condition: Any, turns: int = 10_000) -> None:
    """Let the event loop run until ``condition()`` holds (a bounded number of turns, no clock)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_chunks_are_sent_in_the_order_of_their_writes_and_acknowledged_out_of_the_lock():
    pipeline = Pipeline()
    sender = Sender(pipeline)
    rescorer = Rescorer(Settings.from_env({}), pipeline, None, sender, owned=set)  # type: ignore[arg-type]
    leads = [f"l{i}" for i in range(RESCORE_CHUNK * 2 + 5)]
    task = asyncio.create_task(rescorer._rescore(leads, "model", 0))
    await until(lambda: len(sender.enqueued) == len(leads))  # every chunk before any acknowledgement
    assert [len(c) for c in pipeline.chunks] == [RESCORE_CHUNK, RESCORE_CHUNK, 5]
    assert pipeline.prefetched == pipeline.chunks and pipeline.asked_before == [2, 3, 3]  # the next one loading
    assert sender.enqueued == [lead.encode() for lead in leads]
    async with pipeline.send_order:  # an event batch gets the lock while the acknowledgements are due
        assert not task.done()
    for ack in sender.acks:
        ack.set_result(None)
    await asyncio.wait_for(task, 5)


async def test_a_failed_acknowledgement_fails_the_tick():
    pipeline = Pipeline()
    sender = Sender(pipeline)
    rescorer = Rescorer(Settings.from_env({}), pipeline, None, sender, owned=set)  # type: ignore[arg-type]
    task = asyncio.create_task(rescorer._rescore(["a", "b"], "decay", 0))
    await until(lambda: len(sender.acks) == 2)
    sender.acks[0].set_exception(RuntimeError("broker gone"))
    sender.acks[1].set_result(None)
    try:
        await asyncio.wait_for(task, 5)
    except RuntimeError as exc:
        assert "broker gone" in str(exc)
    else:
        raise AssertionError("the failure was swallowed")


class Backlog(Rescorer):
    """A rescorer over a list of due leads, on a fake clock: each chunk rescored costs ``work_s``."""

    def __init__(self, due: list[str], rate: int, work_s: float, poll_s: float = 0.1) -> None:
        settings = Settings.from_env({"LEADSTREAM_RESCORE_RATE": str(rate),
                                      "LEADSTREAM_RESCORE_POLL_SECONDS": str(poll_s)})
        super().__init__(settings, Idle(), None, None, owned=set)  # type: ignore[arg-type]
        self.backlog, self.work_s, self.now = list(due), work_s, 0.0
        self.rounds: list[tuple[float, int, int]] = []  # (clock, leads done before, leads asked)
        self.clock = lambda: self.now
        self.done = 0
        self.gaps: list[tuple[int, float]] = []  # (chunk, pause between chunks) of each _rescore

        async def sleep(seconds: float) -> None:
            self.now += seconds

        self.sleep = sleep

    def owned(self) -> set[int]:
        return {0}

    async def _due(self, now_ms: int, limit: int, owned: set[int]) -> list[str]:
        self.rounds.append((self.now, self.done, limit))
        due, self.backlog = self.backlog[:limit], self.backlog[limit:]
        return due

    async def _rescore(self, leads: list[str], trigger: str, now_ms: int, chunk: int = RESCORE_CHUNK,
                       gap_s: float = 0.0) -> None:
        self.now += self.work_s + gap_s * ((len(leads) - 1) // chunk)
        self.done += len(leads)
        self.gaps.append((chunk, gap_s))


class Idle:
    """The pipeline as the tick asks it: no model yet; events arrive once ``events`` is set."""

    def __init__(self) -> None:
        self.events = False
        self.scorer = type("NoModel", (), {"version": 0})()

    def busy(self, window_s: float) -> bool:
        return self.events


async def test_a_tick_goes_on_through_a_backlog_at_the_rate_while_no_event_arrives():
    rescorer = Backlog([f"l{i}" for i in range(35)], rate=100, work_s=0.05)  # budget: 10 leads a round
    await rescorer.tick()
    assert rescorer.backlog == [] and rescorer.done == 35  # one tick, not one budget per timer interval
    assert [limit for _, _, limit in rescorer.rounds] == [10, 10, 10, 10]
    for clock, done_before, _ in rescorer.rounds:  # never ahead of 100 leads a second
        assert done_before <= 100 * clock + 1e-9
    assert rescorer.now >= 0.3  # the three full rounds took their time: paced, not as fast as the work


async def test_a_tick_ends_once_events_arrive_and_leaves_the_rest_due():
    rescorer = Backlog([f"l{i}" for i in range(35)], rate=100, work_s=0.05)

    async def rescore(leads: list[str], trigger: str, now_ms: int, chunk: int = RESCORE_CHUNK,
                      gap_s: float = 0.0) -> None:
        rescorer.done += len(leads)
        rescorer.pipeline.events = True  # events arrive during the first round

    rescorer._rescore = rescore  # type: ignore[method-assign]
    await rescorer.tick()
    assert [limit for _, _, limit in rescorer.rounds] == [10]  # the round under way ends, then the tick
    assert len(rescorer.backlog) == 25
    await rescorer.tick()  # the next tick, while events arrive: a tenth of the budget, then it ends
    assert [limit for _, _, limit in rescorer.rounds] == [10, 1] and len(rescorer.backlog) == 24


async def test_a_tick_with_nothing_due_ends_at_once():
    rescorer = Backlog([], rate=100, work_s=0.05)
    await rescorer.tick()
    assert len(rescorer.rounds) == 1 and rescorer.now == 0.0


async def test_a_tick_stops_once_its_partitions_are_taken_away():
    rescorer = Backlog([f"l{i}" for i in range(35)], rate=100, work_s=0.05)
    partitions = [{0}, set()]  # the first round's, then none: a rebalance moved them to another worker
    rescorer.owned = lambda: partitions.pop(0) if len(partitions) > 1 else partitions[0]  # type: ignore[method-assign]
    await rescorer.tick()
    assert [limit for _, _, limit in rescorer.rounds] == [10] and len(rescorer.backlog) == 25


async def test_without_events_a_round_is_a_fifth_of_a_second_of_leads_while_events_get_a_tenth_of_the_rate():
    rescorer = Backlog([f"l{i}" for i in range(50)], rate=100, work_s=0.05, poll_s=1.0)
    await rescorer.tick()  # rounds of 0.2 s at 100 leads/s: events arriving meet one of 20 leads at most
    assert [limit for _, _, limit in rescorer.rounds] == [20, 20, 20] and rescorer.done == 50
    rescorer.backlog = [f"m{i}" for i in range(50)]
    rescorer.pipeline.events = True
    await rescorer.tick()  # while events arrive: a tenth of the rate per 1 s tick, one round
    assert [limit for _, _, limit in rescorer.rounds[3:]] == [10] and len(rescorer.backlog) == 40


async def test_while_events_arrive_a_rounds_chunks_are_spread_over_half_the_tick():
    """Back to back, a busy round's chunks held every event batch of its first ~100 ms behind one:
    now a pause between two chunks spreads a full budget over half the tick's interval."""
    rescorer = Backlog([f"l{i}" for i in range(50)], rate=400, work_s=0.0, poll_s=1.0)
    await rescorer.tick()
    assert rescorer.gaps[-1] == (RESCORE_CHUNK, 0.0)  # no event: no pause
    rescorer.backlog = [f"m{i}" for i in range(50)]
    rescorer.pipeline.events = True
    await rescorer.tick()  # 40 leads (a tenth of 400 per 1 s tick) in chunks of 20: 2 chunks in 0.5 s
    assert rescorer.gaps[-1] == (RESCORE_CHUNK_BUSY, 0.5 * RESCORE_CHUNK_BUSY / 40)


async def test_the_pause_between_chunks_leaves_the_lock_to_event_batches(monkeypatch):
    pipeline = Pipeline()
    sender = Sender(pipeline)
    slept: list[tuple[float, bool]] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        slept.append((seconds, pipeline.send_order.locked()))
        await real_sleep(0)

    chunks = [["a", "b"], ["c", "d"], ["e"]]
    monkeypatch.setattr(asyncio, "sleep", sleep)
    await pipeline.rescore_chunks(chunks, "model", 0, sender.enqueue, gap_s=0.02)
    monkeypatch.undo()
    assert [s for s in slept if s[0] > 0] == [(0.02, False), (0.02, False)]  # between chunks, out of the lock
    assert pipeline.chunks == chunks
