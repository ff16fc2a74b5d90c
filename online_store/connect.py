"""Connections to the online store, from a Feast online-store config.

Feast's Redis store is configured with a ``host:port[,host:port],db=..,password=..,
ssl=..`` connection string; :func:`redis_nodes` reads it as Feast does, and everything that
connects (redis-py for writers and checks, the raw RESP client of the read hot path, one
RESP client per cluster master for bulk writes) starts from it.

:class:`RespClient` is the hot path's connection: one socket per thread, hiredis parses.
redis-py's pipeline costs ~10 µs of Python per command on top of the round trip, which is
most of a feature lookup. Here a request is one ``sendall`` of pre-packed commands and a
loop over ``hiredis.Reader``. Any socket error drops the connection (the next call
reconnects) and is raised as-is.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from typing import Any

import hiredis
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def redis_nodes(connection_string: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Feast's reading of a Redis connection string: the nodes (host, port) and the
    parameters (``db``, ``password``, ``ssl``..., JSON values decoded)."""
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore._parse_connection_string(connection_string)


def redis_client(config: Any, timeout_s: float | None = None) -> Any:
    """A redis-py client for a Feast Redis config (standalone, cluster or sentinel).
    Without ``timeout_s``, Feast's own client, exactly as its store connects; with it,
    one that fails within ``timeout_s`` (start-up checks, the serving read). A cluster
    client with ``timeout_s`` retries an unreachable node once, at once, after re-reading
    the slot map: redis-py's default backs off for up to seconds per retry, which on the
    serving event loop stalls every request while a replica takes over."""
    if timeout_s is None:
        from feast.infra.online_stores.redis import RedisOnlineStore

        return RedisOnlineStore()._get_client(config)
    nodes, params = redis_nodes(config.connection_string)
    kw = {
        "password": params.get("password"),
        "username": params.get("username"),
        "ssl": bool(params.get("ssl", False)),
        "socket_connect_timeout": timeout_s,
        "socket_timeout": timeout_s,
    }
    if config.redis_type == "redis_cluster":
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(n["host"], int(n["port"])) for n in nodes],
            retry=Retry(NoBackoff(), retries=1),
            **kw,
        )
    return redis.Redis(
        host=nodes[0]["host"], port=int(nodes[0]["port"]), db=int(params.get("db", 0)), **kw
    )


def where(config: Any) -> str:
    """The endpoints of a Feast Redis config, for messages (never its password)."""
    return ",".join(f"{n['host']}:{n['port']}" for n in redis_nodes(config.connection_string)[0])


class RespError(ConnectionError):
    """Redis answered with an error reply."""


class RespClient:
    """One raw connection per thread to one Redis node (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        use_ssl: bool = False,
        timeout_s: float = 1.0,
    ) -> None:
        self.address = (host, port)
        self.db, self.username, self.password = db, username, password
        self.ssl = ssl.create_default_context() if use_ssl else None
        self.timeout_s = timeout_s
        self._local = threading.local()

    @classmethod
    def from_feast(cls, connection_string: str, timeout_s: float = 1.0) -> RespClient:
        """A client for a standalone Redis configured as Feast's store is (a
        ``socket_timeout`` in the string wins over ``timeout_s``)."""
        nodes, params = redis_nodes(connection_string)
        password = params.get("password")
        username = params.get("username")
        return cls(
            nodes[0]["host"],
            int(nodes[0]["port"]),
            int(params.get("db", 0)),
            None if username is None else str(username),
            None if password is None else str(password),
            bool(params.get("ssl", False)),
            float(params.get("socket_timeout", timeout_s)),
        )

    @classmethod
    def from_url(cls, url: str, timeout_s: float = 5.0) -> RespClient:
        """A client for a ``redis://`` or ``rediss://`` URL (host, port, credentials, db,
        as redis-py reads them); a URL option it would not honour (a Unix socket, TLS or
        socket settings) is refused with a ``ValueError`` naming it, not ignored."""
        from redis.connection import SSLConnection, parse_url

        p = parse_url(url)
        if "path" in p:
            raise ValueError("the raw client connects over TCP, not to a Unix socket")
        if p.get("connection_class") is SSLConnection:
            del p["connection_class"]
        other = sorted(set(p) - {"host", "port", "db", "username", "password"})
        if other:
            raise ValueError(f"the raw client takes no {', '.join(other)} in its URL")
        return cls(
            p.get("host", "localhost"),
            int(p.get("port", 6379)),
            int(p.get("db", 0)),
            p.get("username"),
            p.get("password"),
            url.startswith("rediss://"),
            timeout_s,
        )

    def _connect(self) -> tuple[socket.socket, hiredis.Reader]:
        sock = socket.create_connection(self.address, timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Python's own socket timeout polls before every recv (~40 µs here); a kernel
        # timeout on a blocking socket bounds a hung server without that cost.
        sock.settimeout(None)
        whole, frac = divmod(self.timeout_s, 1)
        timeval = struct.pack("ll", int(whole), int(frac * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        if self.ssl is not None:
            sock = self.ssl.wrap_socket(sock, server_hostname=self.address[0])
        conn = (sock, hiredis.Reader())
        self._local.conn = conn
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            auth = ("AUTH", self.username, self.password) if self.username else None
            setup.append(auth or ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", str(self.db)))
        if setup:
            self.execute(b"".join(hiredis.pack_command(c) for c in setup), len(setup))
        return conn

    def execute(self, packed: bytes, replies: int) -> list[Any]:
        """Send pre-packed commands, return their ``replies`` replies in order."""
        self.send(packed)
        return self.receive(replies)

    def send(self, packed: bytes) -> None:
        """Send pre-packed commands; their replies wait for :meth:`receive`."""
        conn = getattr(self._local, "conn", None) or self._connect()
        try:
            conn[0].sendall(packed)
        except BaseException:
            self._drop(conn)
            raise

    def receive(self, replies: int, errors: bool = False) -> list[Any]:
        """The next ``replies`` replies on this thread's connection, in order; an error
        reply raises :class:`RespError`, or with ``errors`` is returned in its place (a
        ``hiredis.ReplyError``: the caller judges it, the connection stays usable). The
        timeout bounds the whole wait, not each ``recv``: a server (or a link) that trickles
        its answer a few bytes at a time is cut off like a silent one, within twice it."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raise ConnectionError("no request in flight on this connection")
        sock, reader = conn
        try:
            out: list[Any] = []
            deadline = time.monotonic() + self.timeout_s
            while len(out) < replies:
                reply = reader.gets()
                if reply is False:
                    if time.monotonic() > deadline:  # more to wait for, and no time left
                        raise TimeoutError(f"Redis took over {self.timeout_s:g} s to answer")
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("Redis closed the connection")
                    reader.feed(data)
                    continue
                if isinstance(reply, hiredis.ReplyError) and not errors:
                    raise RespError(str(reply))
                out.append(reply)
            return out
        except BaseException:
            self._drop(conn)
            raise

    def _drop(self, conn: tuple[socket.socket, hiredis.Reader]) -> None:
        self._local.conn = None  # half-read replies: never reuse this socket
        conn[0].close()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn:
            conn[0].close()
            self._local.conn = None


def pack(*args: bytes | str) -> bytes:
    return hiredis.pack_command(args)


class NodeClients:
    """Where each key goes for bulk writes: one RESP connection per Redis node (one for a
    standalone Redis; per cluster master, by the slot map the cluster reports)."""

    def __init__(self, config: Any, timeout_s: float = 30.0) -> None:
        self.cluster = config.redis_type == "redis_cluster"
        nodes, params = redis_nodes(config.connection_string)
        auth = {
            "username": None if params.get("username") is None else str(params["username"]),
            "password": None if params.get("password") is None else str(params["password"]),
            "use_ssl": bool(params.get("ssl", False)),
            "timeout_s": timeout_s,
        }
        if not self.cluster:
            self.clients = [
                RespClient(
                    nodes[0]["host"], int(nodes[0]["port"]), int(params.get("db", 0)), **auth
                )
            ]
            return
        rc = redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(n["host"], int(n["port"])) for n in nodes],
            username=auth["username"],
            password=auth["password"],
            ssl=auth["use_ssl"],
        )
        self.slot_node: list[int] = [0] * 16384
        names: dict[str, int] = {}
        self.clients = []
        for slot, holders in rc.nodes_manager.slots_cache.items():
            primary = holders[0]
            if primary.name not in names:
                names[primary.name] = len(self.clients)
                self.clients.append(RespClient(primary.host, int(primary.port), 0, **auth))
            self.slot_node[slot] = names[primary.name]
        rc.close()

    def node_of(self, key: bytes) -> int:
        """The index in ``clients`` of the node holding ``key``."""
        if not self.cluster:
            return 0
        from redis.crc import key_slot

        return self.slot_node[key_slot(key)]

    def close(self) -> None:
        for c in self.clients:
            c.close()
