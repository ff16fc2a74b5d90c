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


def _dump(settings, fs, request) -> tuple[dict, dict]:
    """Every value in the online store, read directly from the store; and when each Redis
    key that has an expiry expires (epoch seconds: the tiered profile's keys do)."""
    if settings.profile == "production":
        cluster = request.getfixturevalue("redis_cluster")
        client = redis.RedisCluster("127.0.0.1", cluster.ports[0], password=cluster.password)
        keys = [k for k in client.scan_iter() if not k.startswith(b"hotpath:")]
        now = time.time()
        expiry = {k: now + ms / 1000 for k in keys if (ms := client.pttl(k)) >= 0}
        hashes = {k: client.hgetall(k) for k in keys}
        return {"scylla": request.getfixturevalue("scylla").dump()} | hashes, expiry
    if settings.profile == "redis":
        client = redis.Redis.from_url(settings.redis_url)
        # feature hashes only: hotpath:materialized:* records when each view was loaded
        keys = [k for k in client.scan_iter() if not k.startswith(b"hotpath:")]
        return {k: client.hgetall(k) for k in keys}, {}
    path = fs.config.online_store.path
    db = sqlite3.connect(path if path.startswith("/") else str(settings.repo / path))
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
