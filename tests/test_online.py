"""Materialization into SQLite and a real Redis, read back through Feast, point-in-time."""

from __future__ import annotations

import math
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import redis
import reference
from conftest import (
    EDGE_USER,
    FRESH_USER,
    STALE_USER,
    VELOCITY_USER,
    Project,
    production_settings,
    read_offline,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from helpers import ROOT

from pipelines import store
from pipelines.contract import computed_views, feature_views

# every computed view the repo declares: its own offline table, keyed by its join keys
REPO_VIEWS = computed_views(ROOT / "feature_repo")
VIEW_KEYS = {v.name: list(v.keys) for v in REPO_VIEWS}


@pytest.fixture(scope="module", params=["embedded", "redis", "production"])
def materialized(request, batch_done: Project, applied):
    """The store materialized on each profile; ``production`` is a real Redis Cluster plus
    the CQL stand-in for ScyllaDB (``cql_stand_in.py``), so Feast's ScyllaDB store writes
    and reads its views through the real cassandra-driver."""
    if request.param == "embedded":
        s, fs = batch_done.settings, applied
    else:
        if request.param == "redis":
            url = request.getfixturevalue("redis_url")
            s = batch_done.settings.model_copy(update={"profile": "redis", "redis_url": url})
        else:
            cluster, scylla = (request.getfixturevalue(f) for f in ("redis_cluster", "scylla"))
            s = production_settings(batch_done.settings, cluster, scylla)
        fs = store.open_store(s)
        store.apply(fs)
    end = store.materialize(fs, datetime.now(UTC))
    return s, fs, end


def _offline(project: Project, view: str) -> pd.DataFrame:
    if view == "user_profile":
        return pd.read_parquet(project.settings.raw_dir / "users").rename(
            columns={
                "updated_at": "event_timestamp",
                "home_country": "user_home_country",
                "credit_limit": "user_credit_limit",
                "kyc_level": "user_kyc_level",
            }
        )
    return read_offline(project, view)


def _same(actual, expected) -> bool:
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return actual is None
    if isinstance(expected, float | np.floating):
        return actual is not None and float(actual) == float(expected)
    return actual == expected


def _sample_entities(project: Project, keys: list[str], offline: pd.DataFrame) -> list[dict]:
    rng = np.random.default_rng(3)
    pool = offline[keys].drop_duplicates()
    picked = pool.iloc[rng.choice(len(pool), size=min(40, len(pool)), replace=False)]
    newest = offline.sort_values("event_timestamp").tail(5)[keys]  # within any TTL
    picked = pd.concat([picked, newest]).drop_duplicates()
    rows = [{k: int(v) for k, v in r.items()} for r in picked.to_dict("records")]
    if keys == ["user_id"]:
        rows += [
            {"user_id": u} for u in (EDGE_USER, VELOCITY_USER, STALE_USER, FRESH_USER, 123_456_789)
        ]
    return rows


@pytest.mark.parametrize("view", [*sorted(VIEW_KEYS), "user_profile"])
def test_online_equals_latest_in_ttl_offline(materialized, batch_done: Project, view: str) -> None:
    _, fs, end = materialized
    fv = feature_views(batch_done.settings.repo)[view]
    keys = ["user_id"] if view == "user_profile" else VIEW_KEYS[view]
    offline = _offline(batch_done, view)
    expected = reference.latest_within_ttl(offline, keys, pd.Timestamp(end), pd.Timedelta(fv.ttl))
    expected = expected.set_index(keys)
    entity_rows = _sample_entities(batch_done, keys, offline)
    names = [f.name for f in fv.features]
    online = fs.get_online_features(
        features=[f"{view}:{n}" for n in names], entity_rows=entity_rows
    ).to_dict()
    present = 0
    for i, entity in enumerate(entity_rows):
        idx = tuple(entity[k] for k in keys) if len(keys) > 1 else entity[keys[0]]
        want = expected.loc[idx] if idx in expected.index else None
        present += want is not None
        for n in names:
            exp = None if want is None else want[n]
            assert _same(online[n][i], exp), f"{view}.{n} for {entity}: {online[n][i]!r} != {exp!r}"
    assert present > 0, "no sampled entity had a value: the comparison proved nothing"


def test_values_past_ttl_come_back_missing(materialized) -> None:
    _, fs, _ = materialized
    online = fs.get_online_features(
        features=["user_spending_stats:user_txn_count_30d", "user_velocity:user_txn_count_1h"],
        entity_rows=[{"user_id": STALE_USER}],
    ).to_dict()
    # STALE_USER paid once, 40 days ago: its newest snapshot is far older than 2 days.
    assert online["user_txn_count_30d"] == [None]
    assert online["user_txn_count_1h"] == [None]


def _store(settings, fs, request):
    """A direct connection to the profile's online store: an SQLite connection, or a
    redis-py client (a cluster client on the production profile's Redis tier)."""
    if settings.profile == "production":
        cluster = request.getfixturevalue("redis_cluster")
        return redis.RedisCluster("127.0.0.1", cluster.ports[0], password=cluster.password)
    if settings.profile == "redis":
        return redis.Redis.from_url(settings.redis_url)
    path = fs.config.online_store.path
    return sqlite3.connect(path if path.startswith("/") else str(settings.repo / path))


def _dump(settings, fs, request) -> tuple[dict, dict]:
    """Every value in the online store, read directly from the store; and when each Redis
    key that has an expiry expires (epoch seconds: the tiered profile's keys do)."""
    client = _store(settings, fs, request)
    if settings.profile == "production":
        keys = [k for k in client.scan_iter() if not k.startswith(b"hotpath:")]
        now = time.time()
        expiry = {k: now + ms / 1000 for k in keys if (ms := client.pttl(k)) >= 0}
        hashes = {k: client.hgetall(k) for k in keys}
        return {"scylla": request.getfixturevalue("scylla").dump()} | hashes, expiry
    if settings.profile == "redis":
        # feature hashes only: hotpath:materialized:* records when each view was loaded
        keys = [k for k in client.scan_iter() if not k.startswith(b"hotpath:")]
        return {k: client.hgetall(k) for k in keys}, {}
    db = client
    tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
    return {t: sorted(db.execute(f"select * from {t}").fetchall()) for t in tables}, {}


def _differences(before: dict, after: dict) -> list[str]:
    """What differs between two dumps, key by key (a text diff of two whole dumps lists
    keys in the order the store scanned them: a moved key reads as a missing one)."""
    out = [f"gone: {k!r}" for k in before.keys() - after.keys()]
    out += [f"new: {k!r}" for k in after.keys() - before.keys()]
    out += [
        f"changed: {k!r}: {before[k]!r} -> {after[k]!r}"
        for k in before.keys() & after.keys()
        if before[k] != after[k]
    ]
    return sorted(out)


def test_materializing_again_changes_nothing(materialized, request) -> None:
    settings, fs, end = materialized
    before, expiry = _dump(settings, fs, request)
    assert before
    if settings.profile == "redis":  # serving's readiness finds each view recorded
        marker = redis.Redis.from_url(settings.redis_url).hgetall("hotpath:materialized:hotpath")
        assert {v.name.encode() for v in fs.list_feature_views()} <= set(marker), marker
    # again to the same instant: a later one may legitimately change rows (a request-time
    # window that empties in between has an offline row there, and its tiles expire)
    store.materialize(fs, end)
    # re-load a window inside every TTL: the same newest rows, written again
    fs.materialize(start_date=end - timedelta(minutes=30), end_date=end)
    after, _ = _dump(settings, fs, request)
    # a key whose newest event reaches its TTL meanwhile expires, as it should (the
    # production profile's Redis keys expire at newest event + TTL): compared without it
    gone = {k for k, at in expiry.items() if at <= time.time() + 1}
    assert len(gone) < len(before) / 10, f"{len(gone)} keys expire during the test"
    before, after = ({k: v for k, v in d.items() if k not in gone} for d in (before, after))
    assert _differences(before, after) == []
    assert after == before


def test_feature_service_vector_has_request_features(materialized, batch_done: Project) -> None:
    """The on-demand view computes from request data and stored values alike."""
    _, fs, _ = materialized
    tx = batch_done.transactions
    recent = tx[tx.user_id < 1000].sort_values("event_timestamp").iloc[-1]
    values = store.read_vector(
        fs,
        "fraud_detection_v1",
        {"user_id": int(recent.user_id), "merchant_id": int(recent.merchant_id), "amount": 50.0},
    )
    by_name = {v.name: v for v in values}
    avg = by_name["user_amount_avg_30d"].value
    assert avg and by_name["amount_to_avg_30d"].value == pytest.approx(50.0 / avg)
    unknown = store.read_vector(
        fs, "fraud_detection_v1", {"user_id": 123_456_789, "merchant_id": 1, "amount": 50.0}
    )
    by_name = {v.name: v for v in unknown}
    assert by_name["amount_to_avg_30d"].value == -1.0
    assert by_name["is_new_merchant"].value == 1
    assert (
        by_name["user_txn_count_30d"].value is None and by_name["user_txn_count_30d"].age_s is None
    )


def test_historical_features_are_point_in_time(applied, batch_done: Project) -> None:
    """get_historical_features gives, at each instant, the newest row not after it and within
    TTL; rows stamped exactly at the instant count, a microsecond later do not."""
    fs = applied
    day0 = pd.Timestamp(batch_done.edge_day)
    us = pd.Timedelta(microseconds=1)
    instants = [day0, day0 - us, day0 + pd.Timedelta(hours=12), day0 + pd.Timedelta(days=3)]
    users = [EDGE_USER, VELOCITY_USER, STALE_USER, 5, 17, 42]
    entity_df = pd.DataFrame(
        [{"user_id": u, "event_timestamp": t} for u in users for t in instants]
    )
    features = ["user_spending_stats:user_txn_count_7d", "user_velocity:user_amount_sum_1h"]
    got = fs.get_historical_features(entity_df=entity_df, features=features).to_df()
    got["event_timestamp"] = pd.to_datetime(got["event_timestamp"], utc=True)
    got = got.set_index(["user_id", "event_timestamp"]).sort_index()
    for view, col in (
        ("user_spending_stats", "user_txn_count_7d"),
        ("user_velocity", "user_amount_sum_1h"),
    ):
        offline = read_offline(batch_done, view)
        ttl = pd.Timedelta(feature_views(batch_done.settings.repo)[view].ttl)
        for u in users:
            mine = offline[offline.user_id == u]
            for t in instants:
                ok = mine[(mine.event_timestamp <= t) & (mine.event_timestamp >= t - ttl)]
                want = ok.sort_values("event_timestamp")[col].iloc[-1] if len(ok) else None
                have = got.loc[(u, t), col]
                have = None if pd.isna(have) else have
                assert _same(have, want), f"{col} for user {u} at {t}: {have!r} != {want!r}"


def test_entity_rows_whose_keys_run_together_are_told_apart(applied, batch_done: Project) -> None:
    """At one instant, (user 1, merchant 10) and (user 11, merchant 0) each get their own
    row: Feast's Spark join names an entity row by its keys run together ("110"), and
    without hotpath's fix both got whichever row of the two was newer."""
    from online_store.point_in_time import historical_features

    view, col = "user_merchant_history", "user_merchant_txn_count_90d"
    offline = read_offline(batch_done, view)
    pairs = offline[["user_id", "merchant_id"]].drop_duplicates()
    run_together = pairs.user_id.astype(str) + pairs.merchant_id.astype(str)
    pairs = pairs[run_together.duplicated(keep=False)]
    instants = [pd.Timestamp(batch_done.now), pd.Timestamp(batch_done.edge_day)]
    entity_df = pd.concat([pairs.assign(event_timestamp=t) for t in instants], ignore_index=True)
    got = historical_features(applied, entity_df, [f"{view}:{col}"])
    got["event_timestamp"] = pd.to_datetime(got["event_timestamp"], utc=True)
    got = got.set_index(["user_id", "merchant_id", "event_timestamp"]).sort_index()
    ttl = pd.Timedelta(feature_views(batch_done.settings.repo)[view].ttl)
    told_apart = 0
    for t in instants:
        want = {}
        for u, m in pairs.itertuples(index=False):
            mine = offline[(offline.user_id == u) & (offline.merchant_id == m)]
            ok = mine[(mine.event_timestamp <= t) & (mine.event_timestamp >= t - ttl)]
            want[(u, m)] = ok.sort_values("event_timestamp")[col].iloc[-1] if len(ok) else None
            have = got.loc[(u, m, t), col]
            have = None if pd.isna(have) else have
            assert _same(have, want[(u, m)]), f"{col} for {(u, m)} at {t}: {have!r}"
        names = pd.Series({k: f"{k[0]}{k[1]}" for k in want})
        told_apart += sum(
            len({want[k] for k in group.index}) > 1 for _, group in names.groupby(names)
        )
    assert told_apart >= 5  # pairs that share a name but not a value: the case in question


def test_a_tier_failing_first_leaves_no_reply_for_the_next_read(
    materialized, batch_done: Project, tmp_path
) -> None:
    """A store read fails part-way (here a tier before the others, an SQLite file without
    its table): the requests already sent to the other tiers are abandoned, so the next
    read gets its own answers, not the failed read's (on a standalone Redis those replies
    would still be on the connection)."""
    from online_store.read import SqliteReader
    from serving.online_features import OnlineFeatures

    _, fs, end = materialized
    tx = batch_done.transactions
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": 10.0}
        for r in tx.sort_values("event_timestamp").tail(6).itertuples()
    ]
    now = end.timestamp()
    reader = OnlineFeatures(fs, "fraud_detection_v1")
    want = OnlineFeatures(fs, "fraud_detection_v1").read_served(rows[3:], now)
    backends = list(reader._backends)
    first, members = backends[0]
    sqlite3.connect(tmp_path / "empty.db").close()  # no tables
    broken = SqliteReader(tmp_path / "empty.db", fs.project, [first.plans[0]])
    reader._backends = [(broken, [members[0]]), *backends]
    with pytest.raises(sqlite3.OperationalError):
        reader.read_served(rows[:3], now)
    reader._backends = backends
    got = reader.read_served(rows[3:], now)
    assert got.values == want.values and got.ages == want.ages
    assert any(v is not None for v in got.values["user_txn_count_30d"])


def test_fast_path_equals_feast(materialized, batch_done: Project) -> None:
    """The serving fast path returns exactly what get_online_features returns, for every
    feature type used, expired values and unknown entities included; except request-time
    features, which it computes from the tiles at the request instant (Feast's SDK serves
    the last row): those equal the pandas oracle over the exact events at that instant."""
    from serving.online_features import OnlineFeatures

    _, fs, end = materialized
    at_request = {a.name: (v, a) for v in REPO_VIEWS if v.tiles for a in v.aggs}
    fast = OnlineFeatures(fs, "fraud_detection_v1")
    tx = batch_done.transactions
    rng = np.random.default_rng(5)
    picked = tx.iloc[rng.choice(len(tx), size=60, replace=False)]
    rows = [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in picked.itertuples()
    ]
    rows += [
        {"user_id": STALE_USER, "merchant_id": 1, "amount": 10.0},  # expired everywhere
        {"user_id": 123_456_789, "merchant_id": 987_654, "amount": 0.5},  # unknown
        {"user_id": VELOCITY_USER, "merchant_id": 2, "amount": 3.0},
    ]
    want = fs.get_online_features(
        features=fs.get_feature_service("fraud_detection_v1"), entity_rows=rows
    ).to_dict(include_event_timestamps=True)
    got = fast.read(rows, now=end.timestamp())
    end_us = int(reference._micros(pd.Series([pd.Timestamp(end)])).item())
    exact = {  # (view, key values) -> the request-time values at `end` over its events
        (v.name, key if isinstance(key, tuple) else (key,)): reference.request_time_at(
            v, g, [end_us]
        )[0]
        for v in {v.name: v for v, _ in at_request.values()}.values()
        for key, g in tx.groupby(list(v.keys))
    }
    assert set(fast.feature_names) == {k for k in want if not k.endswith("__ts")} - {
        "user_id",
        "merchant_id",
        "amount",
    }
    present = 0
    for i, vec in enumerate(got):
        for name in fast.feature_names:
            if name in at_request:
                view, agg = at_request[name]
                key = (view.name, tuple(rows[i][k] for k in view.keys))
                empty = 0 if agg.function in ("count", "sum") else None  # no event at all
                value, expected = vec.values[name], exact[key][name] if key in exact else empty
                if expected is None or pd.isna(expected):
                    assert value is None, (name, rows[i], value)
                else:
                    assert value == pytest.approx(expected, rel=1e-9), (name, rows[i], value)
                continue
            assert vec.values[name] == want[name][i], (
                name,
                rows[i],
                vec.values[name],
                want[name][i],
            )
            assert type(vec.values[name]) is type(want[name][i]), name
            if vec.ts[name] is not None:
                present += 1
                assert int(vec.ts[name]) == want[f"{name}__ts"][i], name
    assert present > 100


@pytest.mark.parametrize("materialized", ["production"], indirect=True)
def test_scylla_tier_is_written_and_read_over_cql(
    materialized, batch_done: Project, request
) -> None:
    """On the production profile the views tagged ``scylla`` live in ScyllaDB's tables (of
    the CQL stand-in) and nowhere else, and the fast path reads them there: each read is
    one prepared SELECT per entity key and view, through the real cassandra-driver."""
    s, fs, _ = materialized
    from serving.online_features import OnlineFeatures

    scylla = request.getfixturevalue("scylla")
    tiers = {v.name: v.tags["online_store"] for v in fs.list_feature_views()}
    stored = {(ks, t) for ks, t in scylla.tables}
    assert stored == {
        (s.scylla_keyspace, f"hotpath_{v}") for v, t in tiers.items() if t == "scylla"
    }
    assert all(scylla.rows(ks, t) > 0 for ks, t in stored)
    # distinct users and merchants: a key repeated in a batch is read once
    recent = batch_done.transactions.drop_duplicates("user_id").drop_duplicates("merchant_id")
    rows = [{"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": 1.0}
            for r in recent.tail(5).itertuples()]  # fmt: skip
    before = scylla.executed["select"]
    OnlineFeatures(fs, "fraud_detection_v1").read(rows)
    assert scylla.executed["select"] - before == len(rows) * len(stored)


def test_served_vectors_drop_expired_values(materialized) -> None:
    from serving.online_features import OnlineFeatures, served

    _, fs, end = materialized
    fast = OnlineFeatures(fs, "fraud_detection_v1")
    (vec,) = fast.read([{"user_id": VELOCITY_USER, "merchant_id": 2, "amount": 3.0}])
    ttls = fast.ttl_of()
    later = end.timestamp() + 3 * 86400  # three days on, the daily and stream values expired
    had = {n for n, v in vec.values.items() if v is not None and n in ttls}
    expired = served(vec, ttls, now=later)
    assert expired and expired <= had
    assert all(vec.values[n] is None for n in expired)
    assert "user_txn_count_30d" in expired or vec.ts["user_txn_count_30d"] is None


def test_the_raw_client_reads_a_url_as_redis_py_does_or_refuses_it() -> None:
    """Host, port, credentials (percent-decoded), db from the path or the query, TLS; an
    option it would not honour is refused, never ignored."""
    from online_store.connect import RespClient

    c = RespClient.from_url("redis://u:p%40ss@127.0.0.1:6380/2")
    assert (c.address, c.db, c.username, c.password, c.ssl) == (
        ("127.0.0.1", 6380), 2, "u", "p@ss", None
    )  # fmt: skip
    tls = RespClient.from_url("rediss://h")
    assert tls.address == ("h", 6379) and tls.ssl is not None
    assert RespClient.from_url("redis://h?db=3").db == 3
    for url, option in [
        ("unix:///tmp/r.sock", "Unix socket"),
        ("rediss://h?ssl_cert_reqs=none", "ssl_cert_reqs"),
        ("redis://h/1?socket_timeout=3", "socket_timeout"),
    ]:
        with pytest.raises(ValueError, match=option):
            RespClient.from_url(url)


def test_resp_client_auth_db_and_reconnect(tmp_path) -> None:
    """The fast path's Redis connection: AUTH and SELECT from Feast's connection string,
    a clear error on a wrong password, and a fresh connection after the server restarts."""
    import redis as redis_py
    from helpers import start_redis_server

    from online_store.connect import RespClient, RespError, pack

    proc, url = start_redis_server(tmp_path, password="s3cret")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        redis_py.Redis(port=port, password="s3cret", db=2).set("k", "in-db-2")
        good = RespClient.from_feast(f"127.0.0.1:{port},db=2,password=s3cret")
        assert good.execute(pack("GET", "k") + pack("GET", "missing"), 2) == [b"in-db-2", None]
        with pytest.raises(RespError, match="WRONGPASS|invalid"):
            RespClient.from_feast(f"127.0.0.1:{port},password=nope").execute(pack("PING"), 1)
        proc.terminate()
        proc.wait(timeout=10)
        with pytest.raises(OSError):
            good.execute(pack("GET", "k"), 1)
        proc, _ = start_redis_server(tmp_path, password="s3cret", port=port)
        redis_py.Redis(port=port, password="s3cret", db=2).set("k", "again")
        assert good.execute(pack("GET", "k"), 1) == [b"again"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_trickling_answer_is_cut_off_at_the_timeout(tmp_path) -> None:
    """A Redis (or a link) that answers a few bytes at a time, each within the socket's
    timeout: the raw client gives up once the whole answer is past the timeout (it used to
    wait as long as bytes kept coming, and the serving loop with it)."""
    import socket
    import threading

    from helpers import start_redis_server

    from online_store.connect import RespClient, pack

    proc, url = start_redis_server(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:  # the client's bytes through at once, the server's 1 per 20 ms
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", port))
        server.sendall(client.recv(1 << 16))
        answer = server.recv(1 << 16)
        for b in answer:
            if stop.is_set():
                break
            client.sendall(bytes([b]))
            time.sleep(0.02)
        client.close()
        server.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        redis.Redis(port=port).set("k", "x" * 500)
        slow = RespClient("127.0.0.1", listener.getsockname()[1], timeout_s=0.2)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            slow.execute(pack("GET", "k"), 1)  # ~10 s to arrive whole
        assert time.monotonic() - t0 < 5.0  # not the ~10 s the answer takes
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_value_decoding_equals_protobuf() -> None:
    """The fast path's wire-level decoder of plain scalars answers what a protobuf parse
    (Feast's SDK) answers, values and types, at the edges of each encoding; what it does not
    decode is left to protobuf."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from feast.type_map import feast_value_type_to_python_type

    from online_store.layout import decode_value

    protos = [ValueProto(int64_val=v) for v in (0, 1, 127, 128, -1, 2**63 - 1, -(2**63))]
    protos += [ValueProto(int32_val=v) for v in (0, 5, 300, -1, 2**31 - 1, -(2**31))]
    protos += [ValueProto(double_val=v) for v in (0.0, -0.0, 0.1, -3.5e300, math.inf)]
    protos += [ValueProto(float_val=v) for v in (0.0, 0.1, -2.5)]
    protos += [ValueProto(bool_val=v) for v in (True, False)]
    protos += [ValueProto(string_val=v) for v in ("", "app", "é" * 70, "x" * 300)]
    protos += [ValueProto(int64_list_val={"val": [1, 2]}), ValueProto(unix_timestamp_val=7)]
    for proto in protos:
        blob = proto.SerializeToString()
        want = ValueProto.FromString(blob)
        kind = want.WhichOneof("val")
        got = decode_value(blob)
        if kind.endswith("list_val") or kind == "unix_timestamp_val":  # Feast's own rules
            assert got == feast_value_type_to_python_type(want), kind
            continue
        want_value = getattr(want, kind)
        assert got == want_value and type(got) is type(want_value), (kind, got, want_value)
        if kind == "double_val":
            assert math.copysign(1, got) == math.copysign(1, want_value)
    nan = decode_value(ValueProto(double_val=math.nan).SerializeToString())
    assert nan != nan
    assert decode_value(b"") is None


def _overwrite(settings, fs, request, view: str, user: int, field: str, raw: bytes | None) -> None:
    """Put ``raw`` in the stored bytes of ``user``'s ``field`` of ``view`` (a feature, or
    on Redis ``_ts``, its event time, or ``""``: the whole key, a value that is no hash), as
    a foreign writer could; None: delete the user's stored row (of every view on Redis)."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    from online_store import layout

    fv = fs.get_feature_view(view)
    client = _store(settings, fs, request)
    if settings.profile == "embedded":
        key = EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=user)])
        entity = serialize_entity_key(key, fs.config.entity_key_serialization_version)
        table = layout.sqlite_table(fs.project, view)
        db = client
        with db:
            if raw is None:
                db.execute(f'DELETE FROM "{table}" WHERE entity_key = ?', (entity,))
            else:
                db.execute(
                    f'UPDATE "{table}" SET value = ? WHERE entity_key = ? AND feature_name = ?',
                    (raw, entity, field),
                )
        db.close()
        return
    key = layout.redis_key(fs, fv, (user,))
    if raw is None:
        client.delete(key)
        return
    if field == "":  # the whole key: a value that is no hash
        client.set(key, raw)
        return
    name = layout.ts_field(view) if field == "_ts" else layout.feature_field(view, field)
    assert client.hset(key, name, raw) == 0  # it was there


def test_stored_bytes_that_decode_as_no_value_are_missing_for_their_row_alone(
    materialized, batch_done: Project, request
) -> None:
    """Bytes a foreign writer left where a value is stored (a feature's field; on Redis,
    a view's event time too) that decode as no value: that value (that view, for its event
    time) is missing for that row alone; the rows read with it are untouched. It used to
    fail the whole batch's read: a store-error fallback for every row coalesced with it,
    counted against the store breaker."""
    from online_store.tiers import feast_write
    from serving.online_features import OnlineFeatures

    settings, fs, end = materialized
    bad, bad_ts, not_hash = 987_654_318, 987_654_317, 987_654_316  # nobody else's
    view = fs.get_feature_view("user_spending_stats")
    for user in (bad, bad_ts):
        key = EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=user)])
        values = {"user_txn_count_30d": ValueProto(int64_val=5)}
        feast_write(fs, view, [(key, values | {"user_txn_count_7d": ValueProto(int64_val=3)},
                                end, None)])  # fmt: skip
    try:
        _overwrite(settings, fs, request, view.name, bad, "user_txn_count_30d", b"\xff\xff")
        users = [bad, *batch_done.transactions.sort_values("event_timestamp").user_id.tail(3)]
        if settings.profile != "embedded":  # SQLite keeps event times in a column of its own
            _overwrite(settings, fs, request, view.name, bad_ts, "_ts", b"\xff\xff")
            _overwrite(settings, fs, request, view.name, not_hash, "", b"a string")
            users += [bad_ts, not_hash]
        rows = [{"user_id": int(u), "merchant_id": 1, "amount": 10.0} for u in users]
        now = end.timestamp()
        reader = OnlineFeatures(fs, "fraud_detection_v1")
        got = reader.read_served(rows, now)
        assert got.values["user_txn_count_30d"][0] is None
        assert got.values["user_txn_count_7d"][0] == 3  # the value beside it is read
        for i, row in enumerate(rows[1:4], 1):  # the good rows: as read without the bad ones
            alone = reader.read_served([row], now)
            assert {k: v[i] for k, v in got.values.items()} == {
                k: v[0] for k, v in alone.values.items()
            }
        if len(rows) == 6:  # the view whose event time is unreadable: missing
            assert (
                got.values["user_txn_count_7d"][4] is None
                and got.ages["user_spending_stats"][4] is None
            )
            # a key that is no hash (Redis answers WRONGTYPE): every view of it missing
            assert all(got.values[f][5] is None for f in ("user_txn_count_7d", "user_txn_count_1h"))
            assert got.ages["user_spending_stats"][5] is None
            assert got.ages["user_velocity"][5] is None
    finally:  # the store is shared with later tests (Feast's own read fails on the bytes)
        for user in (bad, bad_ts, not_hash):
            _overwrite(settings, fs, request, view.name, user, "", None)
