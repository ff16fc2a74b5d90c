"""Kafka, as the contract declares it: the topic the streamed views read, reached through
confluent-kafka (the client ``bytewax.connectors.kafka`` is built on).

* :func:`declared_topic`: brokers, topics and dead-letter topic of the events source the
  streamed views aggregate (``feature_repo/data_sources.py``: a ``KafkaSource`` with its
  bootstrap servers and topic); each one overridable by the stream settings.
* :func:`cluster_metadata`: the cluster's topics now, or a one-line error naming the
  brokers (the clients themselves retry forever when no broker answers).
* :class:`DeadLetterTopic`: rejected events as JSON envelopes keyed by their source id,
  with ``code`` and ``reason`` headers, written once per id across restarts.
* :func:`producer`: the producer ``hotpath replay --to kafka`` and the dead letters use.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from pipelines.errors import HotpathError

if TYPE_CHECKING:
    from confluent_kafka.admin import ClusterMetadata

    from pipelines.settings import StreamSettings

DEAD_LETTER_SUFFIX = ".dead-letters"


@dataclass(frozen=True)
class KafkaTopic:
    """Where the stream reads and where its rejected events go."""

    brokers: list[str]
    topics: list[str]
    dead_letters: str  # the dead-letter topic

    @property
    def where(self) -> str:
        return ",".join(self.brokers)


def declared_topic(repo: Path, stream: StreamSettings) -> KafkaTopic:
    """The declared events source's brokers and topic unless the settings name others
    (``HOTPATH_STREAM_KAFKA_BROKERS`` / ``_KAFKA_TOPICS``, ``--brokers`` / ``--topics``);
    dead letters to ``HOTPATH_STREAM_DEAD_LETTER`` or ``<first topic>.dead-letters``."""
    options = _events_source(repo).kafka_options
    declared = [b.strip() for b in options.kafka_bootstrap_servers.split(",") if b.strip()]
    brokers = stream.kafka_brokers or declared
    topics = stream.kafka_topics or [options.topic]
    return KafkaTopic(brokers, topics, stream.dead_letter or topics[0] + DEAD_LETTER_SUFFIX)


def _events_source(repo: Path) -> Any:
    """The ``KafkaSource`` the streamed views aggregate (one: ``check_streamed``); with no
    streamed view, the repo's only ``KafkaSource``."""
    from feast import KafkaSource

    from pipelines import contract

    sources = contract.data_sources(repo)
    names = {v.events.name for v in contract.computed_views(repo) if v.streamed}
    if not names:
        names = {n for n, s in sources.items() if isinstance(s, KafkaSource)}
    if len(names) != 1:
        raise HotpathError(
            f"no single Kafka events source declared in {repo} (found: {sorted(names) or 'none'})"
        )
    name = names.pop()
    source = sources[name]
    if not isinstance(source, KafkaSource):
        raise HotpathError(f"events source {name} is a {type(source).__name__}, not a KafkaSource")
    return source


def cluster_metadata(
    brokers: list[str], topic: str | None = None, timeout_s: float = 5.0
) -> ClusterMetadata:
    """The cluster's topics (``topic``: that one, auto-created where the brokers allow it);
    a one-line error when no broker answers within ``timeout_s``."""
    client = AdminClient({"bootstrap.servers": ",".join(brokers), "socket.timeout.ms": 2000})
    try:
        return client.list_topics(topic, timeout=timeout_s)
    except KafkaException as e:  # transport failure, all brokers down
        raise HotpathError(f"Kafka broker unreachable at {','.join(brokers)}: {e}") from None


def check_topics(brokers: list[str], topics: list[str], timeout_s: float = 5.0) -> None:
    """Every topic exists (a one-line error naming the missing ones otherwise)."""
    meta = cluster_metadata(brokers, timeout_s=timeout_s)
    absent = [t for t in topics if t not in meta.topics]
    if absent:
        raise HotpathError(f"Kafka topics not found on {','.join(brokers)}: {absent}")


def producer(brokers: list[str], **config: Any) -> Producer:
    """An idempotent producer (a retried send is never written twice) that batches for a
    few milliseconds."""
    settings = {"bootstrap.servers": ",".join(brokers), "enable.idempotence": True}
    return Producer(settings | {"linger.ms": 5} | config)


def flush(p: Producer, what: str, errors: list[KafkaError], timeout_s: float = 30.0) -> None:
    """Wait until every produced message is acknowledged; a one-line error otherwise
    (``errors``: what the delivery callbacks collected)."""
    left = p.flush(timeout_s)
    if errors or left:
        why = errors[0].str() if errors else f"{left} messages unacknowledged after {timeout_s:g}s"
        raise HotpathError(f"{what}: {why}")


class DeadLetterTopic:
    """Rejected events on a Kafka topic: the value is the same JSON envelope as a line of
    the dead-letter file (``id``, ``reason``, ``code``, ``event``, ``ingest_s``), the key the
    source id (``topic:partition:offset``), and ``code``/``reason`` headers for consumers
    that only route. Checked at construction (the flow's build), so a missing topic fails
    before the first event, not in the sink."""

    def __init__(self, brokers: list[str], topic: str, timeout_s: float = 10.0) -> None:
        self.brokers, self.topic, self.timeout_s = brokers, topic, timeout_s
        meta = cluster_metadata(brokers, topic, timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise HotpathError(
                f"dead-letter topic {topic} does not exist on {','.join(brokers)} and was not "
                f"auto-created ({meta.error if meta else 'no metadata'}): create it"
            )
        self.partitions = sorted(meta.partitions)
        self._producer: Producer | None = None

    def ids(self) -> set[str]:
        """The source ids already on the topic (read to its end now): a recovered run
        replays events its last commit had not covered, and their dead letters may be
        written already."""
        consumer = Consumer(
            {
                "bootstrap.servers": ",".join(self.brokers),
                "group.id": "hotpath-dead-letter-ids",  # never joined nor committed: assign()
                "enable.auto.commit": False,
            }
        )
        try:
            ends = {}
            for p in self.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=self.timeout_s
                )
                if high > low:
                    ends[p] = high
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
            ids: set[str] = set()
            deadline = time.monotonic() + 6 * self.timeout_s
            while ends:
                if time.monotonic() > deadline:
                    raise HotpathError(f"dead-letter topic {self.topic}: not read to its end")
                for m in consumer.consume(1000, timeout=0.5):
                    if m.error() is not None:
                        raise HotpathError(f"dead-letter topic {self.topic}: {m.error().str()}")
                    if m.key() is not None:
                        ids.add(m.key().decode())
                    if m.offset() + 1 >= ends.get(m.partition(), 0):
                        ends.pop(m.partition(), None)
            return ids
        finally:
            consumer.close()

    def write(self, records: list[dict[str, Any]]) -> None:
        """Produce the envelopes and wait for their acknowledgement (the epoch that read
        the events commits only after this returns)."""
        if self._producer is None:
            self._producer = producer(self.brokers)
        errors: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        for rec in records:
            self._producer.produce(
                self.topic,
                key=rec["id"].encode(),
                value=json.dumps(rec).encode(),
                headers=[("code", rec["code"].encode()), ("reason", rec["reason"].encode())],
                on_delivery=delivered,
            )
        flush(self._producer, f"dead-letter topic {self.topic}", errors)
