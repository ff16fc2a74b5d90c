"""A CQL stand-in for the ScyllaDB tier: just enough of Cassandra's native protocol (v4) for
the real cassandra-driver, and Feast's own ScyllaDB online store on top of it, to connect,
create their keyspace and tables, write and read them over TCP.

It is not ScyllaDB (no ScyllaDB or Cassandra server can run on these machines): one node,
one datacenter, no consistency levels, no paging, no auth. What it does check, as a server
would: statements name tables that exist, columns those tables declare, and look rows up by
the partition key; values travel in the driver's own wire encoding and types, rows expire
after their ``USING TTL``. Only the database is stood in for: the reader under test (Feast's
``online_read`` with the driver's decoding, and the fast path around it) runs unchanged.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cassandra.cqltypes import (
    BytesType,
    DateType,
    InetAddressType,
    Int32Type,
    SetType,
    UUIDType,
    VarcharType,
)
from cassandra.protocol import (
    ResultMessage,
    read_binary_string,
    read_int,
    read_longstring,
    read_short,
    write_int,
    write_short,
    write_string,
    write_stringmultimap,
    write_value,
)

VERSION = 4
_HEADER = struct.Struct(">BBhBi")
_CODES = {cls: code for code, cls in ResultMessage.type_codes.items()}
_CQL_TYPES = {"text": VarcharType, "blob": BytesType, "timestamp": DateType, "int": Int32Type}
_FQ = r'"(?P<ks>\w+)"\."(?P<table>\w+)"'
_CREATE_TABLE = re.compile(rf"CREATE TABLE IF NOT EXISTS {_FQ}\s*\((?P<body>.*)\)", re.S | re.I)
_INSERT = re.compile(
    rf"INSERT INTO {_FQ}\s*\((?P<cols>[^)]*)\)\s*VALUES\s*\((?P<marks>[^)]*)\)"
    r"(?P<ttl>\s+USING TTL \?)?\s*;?$",
    re.I,
)
_SELECT = re.compile(rf"SELECT (?P<cols>.+?) FROM {_FQ} WHERE (?P<key>\w+) = \?\s*;?$", re.I)


class CqlError(Exception):
    """An error the stand-in answers with (code, message), as a server would."""

    def __init__(self, code: int, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.code, self.extra = code, extra


def _invalid(message: str) -> CqlError:
    return CqlError(0x2200, message)


@dataclass
class Table:
    columns: dict[str, type]  # name -> cassandra-driver type
    partition_key: str
    clustering_key: str
    rows: dict[Any, dict[Any, dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    kind: str  # "insert" or "select"
    keyspace: str
    table: str
    binds: list[tuple[str, type]]
    results: list[tuple[str, type]]
    ttl: bool = False


class CqlStandIn:
    """Serves on ``host:port`` from a thread until :meth:`stop`, as one node of
    ``datacenter``."""

    def __init__(self, host: str, port: int, datacenter: str) -> None:
        self.host, self.port, self.datacenter = host, port, datacenter
        self.keyspaces: set[str] = set()
        self.tables: dict[tuple[str, str], Table] = {}
        self.prepared: dict[bytes, Prepared] = {}
        self.executed: Counter[str] = Counter()  # "insert" / "select" executions
        self.lock = threading.Lock()
        stand_in = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                stand_in._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rows(self, keyspace: str, table: str) -> int:
        """Live (unexpired) rows stored in ``keyspace.table``."""
        with self.lock:
            t = self.tables[(keyspace, table)]
            now = time.time()
            return sum(1 for part in t.rows.values() for r in part.values() if _live(r, now))

    def dump(self) -> dict[tuple[str, str], dict[Any, dict[Any, dict[str, Any]]]]:
        """Every live row, by table, partition and clustering key (expiry times left out)."""
        now = time.time()
        with self.lock:
            return {
                name: {
                    pk: {ck: {c: v for c, v in r.items() if c != "__expires"}
                         for ck, r in part.items() if _live(r, now)}
                    for pk, part in t.rows.items()
                }
                for name, t in self.tables.items()
            }  # fmt: skip

    # ---------------------------------------------------------------- connection loop
    def _serve(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            while len(buf) < _HEADER.size:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            version, _, stream, opcode, length = _HEADER.unpack_from(buf)
            while len(buf) < _HEADER.size + length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            body = buf[_HEADER.size : _HEADER.size + length]
            buf = buf[_HEADER.size + length :]
            if version & 0x7F != VERSION:
                unsupported = f"Invalid or unsupported protocol version ({version & 0x7F})"
                reply = (0x00, _error(0x000A, f"{unsupported}; supported versions are (4/v4)"))
            else:
                try:
                    reply = self._answer(opcode, io.BytesIO(body))
                except CqlError as e:
                    reply = (0x00, _error(e.code, str(e)) + e.extra)
            op, payload = reply
            sock.sendall(_HEADER.pack(version | 0x80, 0, stream, op, len(payload)) + payload)

    def _answer(self, opcode: int, f: io.BytesIO) -> tuple[int, bytes]:
        if opcode == 0x05:  # OPTIONS
            out = io.BytesIO()
            write_stringmultimap(out, {"CQL_VERSION": ["3.3.1"], "COMPRESSION": []})
            return 0x06, out.getvalue()
        if opcode in (0x01, 0x0B):  # STARTUP, REGISTER
            return 0x02, b""
        if opcode == 0x07:  # QUERY
            return 0x08, self._query(read_longstring(f).strip())
        if opcode == 0x09:  # PREPARE
            return 0x08, self._prepare(read_longstring(f).strip())
        if opcode == 0x0A:  # EXECUTE
            return 0x08, self._execute(f)
        raise CqlError(0x000A, f"opcode {opcode:#x} is not supported by the stand-in")

    # ---------------------------------------------------------------- statements
    def _query(self, cql: str) -> bytes:
        upper = cql.upper()
        if upper.startswith("SELECT") and " FROM SYSTEM" in upper:
            if "SYSTEM.LOCAL" in upper:
                return _rows("system", "local", _LOCAL_COLUMNS, [self._local_row()])
            # no peers, no schema to describe (the driver wants a column even with no rows)
            return _rows("system", "none", [("peer", InetAddressType)], [])
        if upper.startswith("USE "):
            keyspace = cql[4:].strip().strip(';"')
            if keyspace not in self.keyspaces:
                raise _invalid(f"Keyspace '{keyspace}' does not exist")
            out = io.BytesIO()
            write_int(out, 0x0003)
            write_string(out, keyspace)
            return out.getvalue()
        if upper.startswith("CREATE KEYSPACE"):
            match = re.search(r'IF NOT EXISTS "(\w+)"', cql)
            if match is None:
                raise _invalid(f"unsupported: {cql}")
            self.keyspaces.add(match.group(1))
            return _void()
        if upper.startswith("CREATE TABLE"):
            self._create_table(cql)
            return _void()
        if upper.startswith("DROP TABLE"):
            match = re.search(_FQ, cql)
            if match is None:
                raise _invalid(f"unsupported: {cql}")
            with self.lock:
                self.tables.pop((match["ks"], match["table"]), None)
            return _void()
        raise _invalid(f"the stand-in does not run: {cql}")

    def _create_table(self, cql: str) -> None:
        match = _CREATE_TABLE.search(cql)
        if match is None or match["ks"] not in self.keyspaces:
            raise _invalid(f"unsupported or unknown keyspace: {cql}")
        body = match["body"]
        key = re.search(r"PRIMARY KEY\s*\(\s*\(\s*(\w+)\s*\)\s*,\s*(\w+)\s*\)", body)
        if key is None:
            raise _invalid(f"unsupported primary key: {cql}")
        columns = {}
        for name, kind in re.findall(r"^\s*(\w+)\s+([\w<>, ]+?)\s*,\s*$", body, re.M):
            if name.upper() == "PRIMARY":
                continue
            if kind.lower() not in _CQL_TYPES:
                raise _invalid(f"the stand-in has no type {kind}")
            columns[name] = _CQL_TYPES[kind.lower()]
        with self.lock:
            self.tables.setdefault(
                (match["ks"], match["table"]), Table(columns, key.group(1), key.group(2))
            )

    def _table(self, keyspace: str, table: str) -> Table:
        try:
            return self.tables[(keyspace, table)]
        except KeyError:
            raise _invalid(f"unconfigured table {table} (keyspace {keyspace})") from None

    def _prepare(self, cql: str) -> bytes:
        if match := _INSERT.match(cql):
            table = self._table(match["ks"], match["table"])
            cols = [c.strip() for c in match["cols"].split(",")]
            binds = [(c, _column(table, c)) for c in cols]
            if match["ttl"]:
                binds.append(("[ttl]", Int32Type))
            results: list[tuple[str, type]] = []
            statement = Prepared(
                "insert", match["ks"], match["table"], binds, [], bool(match["ttl"])
            )
        elif match := _SELECT.match(cql):
            table = self._table(match["ks"], match["table"])
            if match["key"] != table.partition_key:
                raise _invalid("Cannot execute this query as it might involve data filtering")
            cols = [c.strip() for c in match["cols"].split(",")]
            results = [(c, _column(table, c)) for c in cols]
            binds = [(match["key"], table.columns[match["key"]])]
            statement = Prepared("select", match["ks"], match["table"], binds, results)
        else:
            raise _invalid(f"the stand-in does not prepare: {cql}")
        query_id = hashlib.md5(cql.encode()).digest()
        self.prepared[query_id] = statement
        out = io.BytesIO()
        write_int(out, 0x0004)
        write_string(out, query_id)
        pk = [i for i, (name, _) in enumerate(binds) if name == table.partition_key]
        write_int(out, 0x0001)  # global table spec
        write_int(out, len(binds))
        write_int(out, len(pk))
        for i in pk:
            write_short(out, i)
        write_string(out, statement.keyspace)
        write_string(out, statement.table)
        for name, kind in binds:
            write_string(out, name)
            _write_type(out, kind)
        _write_metadata(out, statement.keyspace, statement.table, results if results else None)
        return out.getvalue()

    def _execute(self, f: io.BytesIO) -> bytes:
        query_id = read_binary_string(f)
        statement = self.prepared.get(query_id)
        if statement is None:  # the driver prepares again on this answer
            raise CqlError(0x2500, "unprepared statement", struct.pack(">H", 16) + query_id)
        read_short(f)  # consistency
        flags = f.read(1)[0]
        values: list[bytes | None] = []
        if flags & 0x01:
            values = [_read_value(f) for _ in range(read_short(f))]
        if len(values) != len(statement.binds):
            raise _invalid(f"expected {len(statement.binds)} values, got {len(values)}")
        bound = {
            name: kind.from_binary(v, VERSION) if v is not None else None
            for (name, kind), v in zip(statement.binds, values, strict=True)
        }
        self.executed[statement.kind] += 1
        with self.lock:
            table = self._table(statement.keyspace, statement.table)
            if statement.kind == "insert":
                ttl = bound.pop("[ttl]", None)
                row = table.rows.setdefault(bound[table.partition_key], {}).setdefault(
                    bound[table.clustering_key], {}
                )
                row.update(bound)
                row["__expires"] = time.time() + ttl if ttl else None
                return _void()
            now = time.time()
            part = table.rows.get(bound[table.partition_key], {})
            found = [part[ck] for ck in sorted(part) if _live(part[ck], now)]
            rows = [[r.get(name) for name, _ in statement.results] for r in found]
        return _rows(statement.keyspace, statement.table, statement.results, rows)

    def _local_row(self) -> list[Any]:
        h = self.host
        return [
            "local", "COMPLETED", h, "stand-in", "3.3.1", self.datacenter, uuid.UUID(int=1), h,
            "org.apache.cassandra.dht.Murmur3Partitioner", "rack1", "3.0.8", h,
            uuid.UUID(int=2), {"0"},
        ]  # fmt: skip


_LOCAL_COLUMNS = [
    ("key", VarcharType), ("bootstrapped", VarcharType), ("broadcast_address", InetAddressType),
    ("cluster_name", VarcharType), ("cql_version", VarcharType), ("data_center", VarcharType),
    ("host_id", UUIDType), ("listen_address", InetAddressType), ("partitioner", VarcharType),
    ("rack", VarcharType), ("release_version", VarcharType), ("rpc_address", InetAddressType),
    ("schema_version", UUIDType), ("tokens", SetType.apply_parameters((VarcharType,))),
]  # fmt: skip


def _live(row: dict[str, Any], now: float) -> bool:
    expires = row.get("__expires")
    return expires is None or expires > now


def _column(table: Table, name: str) -> type:
    if name not in table.columns:
        raise _invalid(f"Undefined column name {name}")
    return table.columns[name]


def _read_value(f: io.BytesIO) -> bytes | None:
    size = read_int(f)
    return None if size < 0 else f.read(size)


def _write_type(out: io.BytesIO, kind: Any) -> None:
    if issubclass(kind, SetType):
        write_short(out, _CODES[SetType])
        _write_type(out, kind.subtypes[0])
        return
    write_short(out, _CODES[kind])


def _write_metadata(
    out: io.BytesIO, keyspace: str, table: str, columns: list[tuple[str, type]] | None
) -> None:
    if columns is None:
        write_int(out, 0x0004)  # no metadata: the statement returns no rows
        write_int(out, 0)
        return
    write_int(out, 0x0001)
    write_int(out, len(columns))
    write_string(out, keyspace)
    write_string(out, table)
    for name, kind in columns:
        write_string(out, name)
        _write_type(out, kind)


def _rows(keyspace: str, table: str, columns: list[tuple[str, type]], rows: list) -> bytes:
    out = io.BytesIO()
    write_int(out, 0x0002)
    _write_metadata(out, keyspace, table, columns)
    write_int(out, len(rows))
    for row in rows:
        for (_, kind), value in zip(columns, row, strict=True):
            write_value(out, None if value is None else kind.serialize(value, VERSION))
    return out.getvalue()


def _void() -> bytes:
    out = io.BytesIO()
    write_int(out, 0x0001)
    return out.getvalue()


def _error(code: int, message: str) -> bytes:
    out = io.BytesIO()
    write_int(out, code)
    write_string(out, message)
    return out.getvalue()


def start_on_loopback(port: int, datacenter: str) -> CqlStandIn:
    """A stand-in on ``port`` (a profile may fix it, as ScyllaDB's 9042) of a loopback
    address of its own (127.x.y.z), so it never collides with another one."""
    rng = random.Random()
    for _ in range(50):
        host = f"127.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(1, 254)}"
        try:
            return CqlStandIn(host, port, datacenter)
        except OSError:
            continue
    raise RuntimeError(f"no loopback address had port {port} free")
