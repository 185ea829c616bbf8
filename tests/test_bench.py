"""The benchmark's load generator: paced sends, latency counted from each event's scheduled time."""

import asyncio
import time

from streams.bench import SEND_TICK_S, _send_paced


class SlowProducer:
    """Records each send's time; every send blocks the loop ``cost_s`` (a busy machine's generator)."""

    def __init__(self, cost_s: float = 0.0) -> None:
        self.cost_s = cost_s
        self.sent: list[tuple[float, bytes]] = []
        self.turns: list[int] = []  # the event loop's turn of each send (see run)
        self.turn = 0

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        time.sleep(self.cost_s)
        self.sent.append((time.perf_counter(), value))
        self.turns.append(self.turn)


def run(producer: SlowProducer, n: int, rate: float) -> dict[str, float]:
    records = [("t", b"k", str(i).encode()) for i in range(n)]
    sent_at: dict[str, float] = {}

    async def main() -> None:
        async def count_turns() -> None:  # sends between two of its turns left without a yield
            while True:
                producer.turn += 1
                await asyncio.sleep(0)

        counter = asyncio.create_task(count_turns())
        await _send_paced(producer, records, [f"e{i}" for i in range(n)], rate, sent_at)
        counter.cancel()

    asyncio.run(main())
    return sent_at


def test_every_record_goes_once_in_order_never_before_its_time():
    producer = SlowProducer()
    sent_at = run(producer, 60, rate=1000.0)
    assert [value for _, value in producer.sent] == [str(i).encode() for i in range(60)]
    assert all(at >= sent_at[f"e{i}"] for i, (at, _) in enumerate(producer.sent))


def test_a_late_send_counts_from_its_scheduled_time():
    # Each send takes 2 ms while events are due every 0.5 ms: they leave late, and their latency
    # starts at their schedule (1/rate apart), not when the generator got round to them.
    producer = SlowProducer(cost_s=0.002)
    sent_at = run(producer, 40, rate=2000.0)
    start = sent_at["e0"]
    assert all(abs(sent_at[f"e{i}"] - (start + i / 2000.0)) < 1e-9 for i in range(40))
    assert producer.sent[-1][0] - sent_at["e39"] > 0.05  # the last one left ~60 ms after its time


def test_events_due_within_a_tick_leave_together():
    # One group per tick (a producer batches what it is handed without a yield): 40 events per
    # tick of 2 ms at 20,000/s; a sleep per event would make ~200 groups.
    producer = SlowProducer()
    run(producer, 200, rate=20_000.0)
    assert SEND_TICK_S == 0.002 and len(set(producer.turns)) <= 200 / 10


def test_it_says_how_late_each_send_was():
    producer = SlowProducer(cost_s=0.002)
    records = [("t", b"k", b"v")] * 20
    late = asyncio.run(_send_paced(producer, records, [f"e{i}" for i in range(20)], 2000.0, {}))
    assert len(late) == 20 and late[0] < 0.001 and late[-1] > 0.02  # the last one waited for 19 slow sends
