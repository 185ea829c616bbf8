"""The worker's I/O per batch, ours against the clients' own ways, on the running stack (Kafka and Redis).

    .venv/bin/python benchmarks/bench_io.py [rounds]

- Redis: a pipeline of 100 ``HMGET``s of rescore-sized leads (2.2 KB states) through redis-py's
  pipeline and through :func:`streams.clients.pipelined`: CPU per command.
- Kafka: rounds of 500 records of 600 bytes over 8 partitions, each followed by 30 ms of compute
  without a turn of the event loop (as a batch's compute), produced by :class:`streams.rescoring.Sender`
  (one record batch per partition) and by aiokafka's ``send`` per record: CPU and wall per round.

Figures only, nothing asserted. It uses Redis database 14 (flushed) and a topic of its own.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402

from streams.clients import KeyPartitioner, kafka_kwargs, pipelined, redis_client  # noqa: E402
from streams.pipeline import Out  # noqa: E402
from streams.rescoring import Sender  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402
from tests.conftest import redis_test_url  # noqa: E402


async def redis_figures(settings: Settings, rounds: int) -> None:
    client = redis_client(settings, redis_test_url(settings.redis_url, 14))  # `leadstream bench`'s database
    await client.flushdb()
    keys = [f"lead:{{{i % 32:02d}}}:bench-{i}" for i in range(100)]
    for key in keys:
        await client.hset(key, mapping={"v": "7", "s": b"x" * 2200, "dts": ""})
    commands = [("HMGET", key, b"v", b"s", b"dts") for key in keys]
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(rounds):
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            theirs = await pipe.execute()
        t1 = time.process_time()
        for _ in range(rounds):
            ours = await pipelined(client, commands)
        t2 = time.process_time()
        assert ours == theirs
        per = rounds * len(commands)
        print(f"redis, 100 HMGETs: redis-py's pipeline {(t1 - t0) / per * 1e6:.1f} µs, "
              f"pipelined {(t2 - t1) / per * 1e6:.1f} µs of CPU a command")
    await client.flushdb()
    await client.aclose()


async def kafka_figures(settings: Settings, rounds: int) -> None:
    topic = f"bench-io-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, {topic: 8})
    producer = AIOKafkaProducer(**kafka_kwargs(settings), acks="all", linger_ms=0, partitioner=KeyPartitioner())
    await producer.start()
    app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer))
    topics = SimpleNamespace(by_kind=lambda kind: SimpleNamespace(get_topic_name=lambda: topic))
    sender = Sender(app, topics)  # type: ignore[arg-type]

    async def per_record(outs: list[Out]) -> list[object]:
        return [await producer.send(topic, o.value, key=o.key) for o in outs]

    value = b"v" * 600
    try:
        for name, enqueue in [("Sender (a batch per partition)", sender.enqueue), ("send per record", per_record)] * 3:
            wall = cpu = 0.0
            in_flight: list[list] = []
            for n in range(rounds):
                outs = [Out("scores", f"lead-{(n * 500 + i) % 1000}".encode(), value) for i in range(500)]
                t0, c0 = time.perf_counter(), time.process_time()
                in_flight.append(await enqueue(outs))
                wall, cpu = wall + time.perf_counter() - t0, cpu + time.process_time() - c0
                if len(in_flight) > 2:  # as the scoring loop: two batches' acknowledgements outstanding
                    await asyncio.gather(*in_flight.pop(0))
                busy_until = time.perf_counter() + 0.03
                while time.perf_counter() < busy_until:  # the next batch's compute
                    pass
                await asyncio.sleep(0)
            for acks in in_flight:
                await asyncio.gather(*acks)
            print(f"kafka, 500 records: {name}: {cpu / rounds * 1000:.2f} ms of CPU, "
                  f"{wall / rounds * 1000:.2f} ms of wall to hand them over")
    finally:
        await producer.stop()
        admin = AIOKafkaAdminClient(**kafka_kwargs(settings))
        await admin.start()
        await admin.delete_topics([topic])
        await admin.close()


async def main(rounds: int) -> None:
    settings = Settings.from_env()
    await redis_figures(settings, rounds)
    await kafka_figures(settings, rounds)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 40))
