"""Feast's online layout, spelled once: keys, field names, value and timestamp codecs.

Feast's Redis store keeps one hash per entity key (the serialized entity key followed by
the project name) holding, for every view on that key, one field per feature named
``mmh3("<view>:<feature>")`` (a serialized ``ValueProto``) and a ``_ts:<view>`` field (a
serialized protobuf ``Timestamp``: the row's event time). Its SQLite store keeps one table
``<project>_<view>`` with rows (entity key, feature name, value, event time). The writers
(fast materialization, the streaming sink), the serving fast path and the checks all go
through this module, so they cannot disagree with each other or with Feast.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key, serialize_entity_key_prefix
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type
from feast.types import Float32, Float64, Int32, Int64, String
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

# ------------------------------------------------------------------ names


def ts_field(view: str) -> bytes:
    """The hash field holding ``view``'s event time."""
    return f"_ts:{view}".encode()


def feature_field(view: str, feature: str) -> bytes:
    """The hash field holding one feature's value (Feast's murmur3 of ``view:feature``)."""
    return _mmh3(f"{view}:{feature}")


def hash_fields(view: str, features: tuple[str, ...] | list[str]) -> list[bytes]:
    """The fields an HMGET of ``view`` reads: its features in order, then its event time."""
    return [feature_field(view, f) for f in features] + [ts_field(view)]


def sqlite_table(project: str, view: str) -> str:
    """Feast's SQLite table of ``view``."""
    return f"{project}_{view}"


def materialized_key(project: str) -> str:
    """The Redis hash where materialization records, per view, the end of the newest
    window it loaded: a store that restarted empty has none, and serving is not ready."""
    return f"hotpath:materialized:{project}"


# ------------------------------------------------------------------ entity keys

_KEY_FIELDS = {
    ValueType.INT64: "int64_val",
    ValueType.INT32: "int32_val",
    ValueType.STRING: "string_val",
}


class KeyEncoder:
    """Feast's serialized entity key (``serialize_entity_key``, version 3) for one set of
    join keys, as a constant prefix plus struct-packed values: ~1 µs instead of building
    a protobuf per key. Checked against Feast's own function at construction. Readers and
    writers all use it, so reads and writes agree."""

    _PACK = {
        ValueType.INT64: lambda v: struct.pack("<IIq", ValueType.INT64.value, 8, v),
        ValueType.INT32: lambda v: struct.pack("<IIi", ValueType.INT32.value, 4, v),
        ValueType.STRING: lambda v: (
            struct.pack("<II", ValueType.STRING.value, len(b := v.encode())) + b
        ),
    }

    def __init__(self, join_keys: tuple[str, ...], types: tuple[ValueType, ...], version: int):
        if version != 3 or any(t not in self._PACK for t in types):
            raise ValueError(
                f"the fast path reads entity keys of version 3 with {list(self._PACK)} values"
            )
        self.join_keys = join_keys
        self.prefix = serialize_entity_key_prefix(list(join_keys), version)
        self.packers = [self._PACK[t] for t in types]
        probe = tuple("7" if t == ValueType.STRING else 7 for t in types)
        proto = EntityKeyProto(
            join_keys=list(join_keys),
            entity_values=[
                ValueProto(**{_KEY_FIELDS[t]: v}) for t, v in zip(types, probe, strict=True)
            ],
        )
        if self.encode_values(probe) != serialize_entity_key(proto, version):
            raise ValueError("Feast's entity key layout changed: the fast path can't read it")

    @classmethod
    def for_view(cls, store: FeatureStore, view: Any) -> KeyEncoder:
        """The encoder of ``view``'s entities, join keys sorted as Feast serializes them."""
        keys = sorted((store.get_entity(e).join_key, store.get_entity(e).value_type)
                      for e in view.entities)  # fmt: skip
        return cls(
            tuple(k for k, _ in keys),
            tuple(t for _, t in keys),
            store.config.entity_key_serialization_version,
        )

    def encode_values(self, values: tuple[Any, ...]) -> bytes:
        return self.prefix + b"".join(p(v) for p, v in zip(self.packers, values, strict=True))

    def encode(self, row: dict[str, Any]) -> bytes:
        if len(self.packers) == 1:
            return self.prefix + self.packers[0](row[self.join_keys[0]])
        return self.encode_values(tuple(map(row.__getitem__, self.join_keys)))


def redis_key(store: FeatureStore, view: Any, values: tuple[Any, ...]) -> bytes:
    """The Redis key of one entity of ``view`` (join-key values in sorted join-key order):
    its serialized entity key, then the project. Builds an encoder: not for hot loops."""
    return KeyEncoder.for_view(store, view).encode_values(values) + store.project.encode()


# ------------------------------------------------------------------ values


class UnsupportedValue(ValueError):
    """A feature type a fast writer does not encode."""


def value_bytes(dtype: Any) -> Callable[[Any], bytes]:
    """Python value -> serialized ValueProto, as Feast writes it (empty for nulls and NaN),
    chosen once per feature (dtype comparison is slow); repeated values are cached."""
    if dtype == Float64:
        pack = struct.Struct("<d").pack
        return lambda v: b"" if v is None or v != v else b")" + pack(v)  # field 5, fixed64
    cache: dict[Any, bytes] = {}
    field = {Int64: "int64_val", Int32: "int32_val", String: "string_val", Float32: "float_val"}
    name = field.get(dtype)
    if name is None:
        raise UnsupportedValue(f"fast materialization does not encode {dtype}")

    def encode(v: Any) -> bytes:
        if v is None or v != v:
            return b""
        out = cache.get(v)
        if out is None:
            out = ValueProto(**{name: v}).SerializeToString()
            if len(cache) < 100_000:
                cache[v] = out
        return out

    return encode


def value_proto(dtype: Any) -> Callable[[Any], ValueProto]:
    """Feature value -> ValueProto (what Feast's ``online_write_batch`` takes) for the
    stream's types, chosen once per feature."""
    if dtype == Int64:
        return lambda v: ValueProto(int64_val=int(v))
    if dtype == Float64:
        return lambda v: ValueProto(double_val=float(v))
    raise UnsupportedValue(f"stream features are Int64 or Float64, not {dtype}")


def decode_value(blob: bytes | None) -> Any:
    """ValueProto bytes to the Python value Feast's SDK returns (memoised: counts, flags
    and ratios repeat across entities, and a dict lookup is ~20x cheaper than a parse).
    Plain scalars are read from their wire bytes (:func:`_scalar`); anything else is
    parsed by protobuf."""
    if not blob:
        return None
    try:
        return _DECODED[blob]
    except KeyError:
        pass
    out = _scalar(blob)
    if out is _PARSE:
        value = ValueProto()
        value.ParseFromString(blob)
        kind = value.WhichOneof("val")
        if kind not in _SCALARS:
            return feast_value_type_to_python_type(value)  # lists, maps: Feast's own rules
        out = getattr(value, kind)
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    _DECODED[blob] = out
    return out


def decode_values(blobs: Sequence[bytes | None]) -> list[Any]:
    """:func:`decode_value` of each of ``blobs`` (one view's HMGET answer), cached values
    looked up inline."""
    cached = _DECODED
    return [cached[b] if b in cached else decode_value(b) for b in blobs]


_PARSE = object()  # _scalar's answer for what it does not decode
_DOUBLE = struct.Struct("<d").unpack_from
_FLOAT = struct.Struct("<f").unpack_from


def _scalar(blob: bytes) -> Any:
    """A ValueProto holding one plain scalar (as Feast writes them: one field, nothing
    else) decoded from its wire bytes, ~10x faster than a protobuf parse; ``_PARSE`` for
    anything else (other fields, odd encodings, invalid text), which protobuf decides."""
    tag, n = blob[0], len(blob)
    if tag == 0x29:  # field 5 double_val, fixed64
        return _DOUBLE(blob, 1)[0] if n == 9 else _PARSE
    if tag == 0x20 or tag == 0x18 or tag == 0x38:  # int64_val 4, int32_val 3, bool_val 7
        if n == 2 and blob[1] < 0x80:  # 0..127: one byte
            return blob[1] != 0 if tag == 0x38 else blob[1]
        if n > 11:
            return _PARSE
        v, shift = 0, 0
        for i in range(1, n):
            b = blob[i]
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                if i != n - 1:
                    return _PARSE
                break
        else:
            return _PARSE
        v &= 0xFFFFFFFFFFFFFFFF
        if tag == 0x38:
            return v != 0
        if tag == 0x18:
            v &= 0xFFFFFFFF
            return v - (1 << 32) if v >= 1 << 31 else v
        return v - (1 << 64) if v >= 1 << 63 else v
    if tag == 0x35:  # field 6 float_val, fixed32
        return _FLOAT(blob, 1)[0] if n == 5 else _PARSE
    if tag == 0x12 and n > 1 and blob[1] < 0x80:  # field 2 string_val, length < 128
        if blob[1] != n - 2:
            return _PARSE
        try:
            return blob[2:].decode()
        except UnicodeDecodeError:
            return _PARSE
    return _PARSE


_DECODED: dict[bytes, Any] = {}
_STAMPS: dict[bytes | None, float] = {}
_DECODED_MAX = 200_000
_SCALARS = {
    "int64_val",
    "int32_val",
    "double_val",
    "float_val",
    "string_val",
    "bool_val",
    "bytes_val",
}


# ------------------------------------------------------------------ event times


def decode_stamp(blob: bytes | None) -> float:
    """A ``_ts:<view>`` field in epoch seconds (memoised like values: a daily snapshot
    stamps every entity alike)."""
    try:
        return _STAMPS[blob]
    except KeyError:
        pass
    stamp = Timestamp()
    if blob:
        stamp.ParseFromString(blob)
    out = stamp.seconds + stamp.nanos / 1e9
    if len(_STAMPS) >= _DECODED_MAX:
        _STAMPS.clear()
    _STAMPS[blob] = out
    return out


def stamp_micros(blob: bytes) -> int:
    """A ``_ts:<view>`` field in whole epoch microseconds (exact, for comparisons)."""
    stamp = Timestamp()
    stamp.ParseFromString(blob)
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def encode_stamp(micros: int) -> bytes:
    """Epoch microseconds as a ``_ts:<view>`` field."""
    return Timestamp(
        seconds=micros // 1_000_000, nanos=(micros % 1_000_000) * 1000
    ).SerializeToString()


def seconds(value: Any) -> float | None:
    """An event time as another store returns it (epoch number, datetime, ISO text; naive
    means UTC) in epoch seconds."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp()


# ------------------------------------------------------------------ writes

# Compare-and-set in Feast's Redis layout, for every view of one entity in one call:
# ARGV = new event time (µs), its Timestamp bytes, the key's expiry (epoch s, 0: none; on
# tiered stores, as ``online_store.tiers`` sets it), then per view: its ``_ts:<view>`` field,
# its field count n, and n field/value pairs. A view is written unless its stored event
# time is newer; ties overwrite, so a late event's correction keeps the row's time
# (Feast's own write skips equal times, which would drop corrections).
COMPARE_AND_SET = """
local function micros(b)
  if not b then return -1 end
  local secs, nanos, i = 0, 0, 1
  while i <= #b do
    local tag = string.byte(b, i); i = i + 1
    local v, mul = 0, 1
    repeat
      local c = string.byte(b, i); i = i + 1
      v = v + (c % 128) * mul; mul = mul * 128
    until c < 128
    if tag == 8 then secs = v elseif tag == 16 then nanos = v end
  end
  return secs * 1000000 + math.floor(nanos / 1000)
end
local new, expire_at, written, i = tonumber(ARGV[1]), tonumber(ARGV[3]), 0, 4
while i <= #ARGV do
  local ts_field, n = ARGV[i], tonumber(ARGV[i + 1])
  if new >= micros(redis.call('HGET', KEYS[1], ts_field)) then
    redis.call('HSET', KEYS[1], ts_field, ARGV[2], unpack(ARGV, i + 2, i + 1 + 2 * n))
    written = written + 1
  end
  i = i + 2 + 2 * n
end
if written > 0 and expire_at > 0 then
  redis.call('EXPIREAT', KEYS[1], expire_at, 'NX')
  redis.call('EXPIREAT', KEYS[1], expire_at, 'GT')
end
return written
"""


def expire_at(event_s: float, ttl_s: float) -> int:
    """When a key whose newest event is at ``event_s`` expires (the second after its TTL)."""
    return int(event_s + ttl_s) + 1


def expire_commands(key: bytes, at: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Set ``key``'s expiry to ``at``, extending (never shortening) an earlier one: a key
    without expiry gets one (NX), one expiring earlier is extended (GT)."""
    when = str(at).encode()
    return ("EXPIREAT", key, when, "NX"), ("EXPIREAT", key, when, "GT")
