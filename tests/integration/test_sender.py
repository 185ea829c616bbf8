"""The scoring loop's and the rescorer's producer (:class:`streams.rescoring.Sender`) on the real broker."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaProducer

from streams.clients import KeyPartitioner, kafka_kwargs
from streams.pipeline import Out
from streams.rescoring import Sender

pytestmark = pytest.mark.integration


def _sender(producer: AIOKafkaProducer, names: dict[str, str]) -> Sender:
    app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer))  # Faust's, as the worker has it
    topics = SimpleNamespace(by_kind=lambda kind: SimpleNamespace(get_topic_name=lambda: names[kind]))
    return Sender(app, topics)  # type: ignore[arg-type]


async def test_records_go_in_order_to_the_partition_the_producers_partitioner_gives_their_key(
        stack, topic_factory, consume):
    """Batched by partition, overflowing the producer's batch size several times: each record on the
    partition ``send`` puts its key on, in the order given within each partition, every one
    acknowledged; a record without a key and one bigger than a batch go through ``send``."""
    scores, hot = await topic_factory(partitions=4), await topic_factory(partitions=3)
    names = {"scores": scores, "hot": hot, "dead_letter": hot, "training": hot}
    producer = AIOKafkaProducer(**kafka_kwargs(stack), acks="all", partitioner=KeyPartitioner(), max_batch_size=2048)
    await producer.start()
    try:
        outs = [Out("scores" if i % 3 else "hot", f"lead-{i % 23}".encode(), f"{i:04d}".encode() * 20) for i in range(400)]
        outs.insert(7, Out("dead_letter", None, b"no key"))
        outs.insert(100, Out("scores", b"lead-5", b"big" * 1000))  # more than a batch of 2,048 bytes alone
        acks = await _sender(producer, names).enqueue(outs)
        assert len(acks) < len(outs) / 5  # batches, not a future per record
        for ack in acks:
            await ack
        truth = {}  # where send() itself puts each key
        for key in {o.key for o in outs if o.key is not None}:
            for topic in (scores, hot):
                truth[topic, key] = (await (await producer.send(topic, b"probe", key=key))).partition
    finally:
        await producer.stop()
    records = await consume(scores, sum(o.kind == "scores" for o in outs) + len({o.key for o in outs}) - 1)
    records += await consume(hot, sum(o.kind != "scores" for o in outs) + len({o.key for o in outs}) - 1)
    got: dict[tuple[str, int], list[bytes]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        if r.value == b"probe":
            continue
        got[r.topic, r.partition].append(r.value)
        if r.key is not None:
            assert r.partition == truth[r.topic, r.key], (r.topic, r.key)
    want: dict[tuple[str, int], list[bytes]] = defaultdict(list)
    for o in outs:
        topic = names[o.kind]
        if o.key is not None:
            want[topic, truth[topic, o.key]].append(o.value)
    assert [v for v in got[hot, next(p for (t, p), vs in got.items() if t == hot and b"no key" in vs)]
            if v == b"no key"] == [b"no key"]
    for tp, values in want.items():
        assert [v for v in got[tp] if v != b"no key"] == values, tp
