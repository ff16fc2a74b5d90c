"""The dead-letter output: rejected and late events, with the reason, written once per
source id (a recovered run replays what its last commit had not covered) to a Redis
stream, a Kafka topic or a JSON-lines file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from pipelines.stream import metrics
from pipelines.stream.events import Rejected
from pipelines.stream.retry import retrying

if TYPE_CHECKING:
    from pipelines.stream.kafka import DeadLetterTopic


# Write a dead letter once per source id (KEYS: the dead-letter stream, its companion hash
# source id -> dead-letter entry id; ARGV: the source id, then the entry's field/value pairs).
_DEAD_LETTER_ONCE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], unpack(ARGV, 2))
redis.call('HSET', KEYS[2], ARGV[1], entry)
return 1
"""


class _DeadLetterPartition(StatefulSinkPartition[tuple[str, Rejected], None]):
    """Writes each source id at most once, because a recovered run replays whatever its
    last commit had not covered: in Redis by the script above (the id hash is
    ``<stream>:ids``), in a file or a Kafka topic by skipping the ids already in it at
    start-up."""

    def __init__(self, target: str, redis_url: str | None, topic: DeadLetterTopic | None) -> None:
        self.target, self.topic = target, topic
        # a timeout, so that a Redis that stops answering is retried (``retrying``), not
        # waited for forever
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5.0) if redis_url else None
        if self.client is not None:
            self.once = self.client.register_script(_DEAD_LETTER_ONCE)
            self.ids_key = f"{target}:ids"
        else:
            self.seen = topic.ids() if topic is not None else _ids_in_file(Path(target))

    def write_batch(self, items: list[tuple[str, Rejected]]) -> None:
        if self.client is not None:  # once per id: a write made again is harmless
            news = retrying(lambda: self._write_redis(items), "dead-letter write")
            written = [r for (_, r), new in zip(items, news, strict=True) if new]
        else:
            written, records = [], []
            for sid, r in items:
                if sid in self.seen:
                    continue
                self.seen.add(sid)
                written.append(r)
                rec = {"id": sid, "reason": r.reason, "code": r.code}
                records.append(rec | {"event": _jsonable(r.raw), "ingest_s": r.ingest_s})
            if records and self.topic is not None:
                self.topic.write(records)
            elif records:
                path = Path(self.target)
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:
                    f.writelines(json.dumps(rec) + "\n" for rec in records)
        for r in written:
            metrics.DEAD_LETTERS.labels(r.code).inc()
            if r.code == "late":  # here, once per event however many key groups it was late for
                metrics.LATE.inc()

    def _write_redis(self, items: list[tuple[str, Rejected]]) -> list[Any]:
        assert self.client is not None
        pipe = self.client.pipeline(transaction=False)
        for sid, r in items:
            fields = ["reason", r.reason, "code", r.code, "event", json.dumps(_jsonable(r.raw))]
            self.once(keys=[self.target, self.ids_key], args=[sid, *fields], client=pipe)
        return pipe.execute()

    def snapshot(self) -> None:
        return None  # nothing to restore: the written ids are the store's own state


def _ids_in_file(path: Path) -> set[str]:
    """The ids already in a dead-letter file; a last line cut short by a crash is dropped
    (its event is replayed, the epoch that read it was never committed)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    ids: set[str] = set()
    for line in data.decode(errors="replace").splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue  # a record written before dead letters carried ids
    return ids


class DeadLetterSink(FixedPartitionedSink[tuple[str, Rejected], None]):
    """A Redis stream (``redis_url`` given), a Kafka topic (``kafka_brokers`` given: checked
    now, see ``pipelines.stream.kafka.DeadLetterTopic``) or a JSON-lines file: the source id
    (``id``), the reason, its code and the original event; once per source id.

    One partition: one writer (one file, however many workers). A partitioned sink is
    snapshotted at each epoch's end, after that epoch's writes, so Bytewax commits an epoch
    only once its dead letters are written (a dynamic sink's writes are not waited for)."""

    def __init__(
        self, target: str, redis_url: str | None = None, kafka_brokers: list[str] | None = None
    ) -> None:
        self.target, self.redis_url = target, redis_url
        self.topic: DeadLetterTopic | None = None
        if kafka_brokers:
            from pipelines.stream.kafka import DeadLetterTopic

            self.topic = DeadLetterTopic(kafka_brokers, target)  # exists (or is created) now

    def list_parts(self) -> list[str]:
        return ["dead-letter"]

    def part_fn(self, item_key: str) -> int:
        return 0

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _DeadLetterPartition:
        return _DeadLetterPartition(self.target, self.redis_url, self.topic)


def _jsonable(raw: Any) -> Any:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    if isinstance(raw, dict):
        return {
            (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)): _jsonable(v)
            for k, v in raw.items()
        }
    if isinstance(raw, str | int | float | bool) or raw is None:
        return raw
    return repr(raw)
