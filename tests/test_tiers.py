"""The tiered online store against a real 3-master Redis Cluster, with SQLite standing in
for the ScyllaDB tier (the same routing code path), and the profiles' start-up checks."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import FRESH_USER, Project
from feast import FeatureStore, FeatureView, Field
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.types import Int64
from helpers import ROOT, concurrently, free_port, start_redis_cluster

from online_store import layout
from online_store.tiers import UnsetVariableError, feast_write, store_config, tier_of
from pipelines import store
from pipelines.errors import HotpathError
from pipelines.settings import Settings

SERVICE = "fraud_detection_v1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"), replicas=1)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tier_root(batch_done: Project, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiers") / "project"
    shutil.copytree(
        batch_done.settings.repo.parent,
        root,
        ignore=shutil.ignore_patterns("registry*", "online*", "__pycache__", "stream"),
    )
    return root


def _tiered_yaml(root: Path, cluster) -> Path:
    base = (root / "feature_repo" / "feature_store.redis.yaml").read_text()
    tail = base[base.index("offline_store:") :]
    path = root / "feature_repo" / "feature_store.tiered-test.yaml"
    path.write_text(
        f"""project: hotpath
provider: local
registry: ../data/registry_tiered.db
online_store:
  type: online_store.tiers.TieredOnlineStore
  tiers:
    redis:
      type: redis
      redis_type: redis_cluster
      connection_string: "{cluster.nodes},password={cluster.password}"
    scylla:
      type: sqlite
      path: ../data/scylla_stand_in.db
{tail}"""
    )
    return path


@pytest.fixture(scope="module")
def stores(tier_root, cluster, batch_done: Project):
    """The same repo materialized to the same instant: tiered (Redis Cluster + SQLite) and
    single-store (SQLite)."""
    end = datetime.now(UTC)
    tiered = FeatureStore(
        repo_path=str(tier_root / "feature_repo"), fs_yaml_file=_tiered_yaml(tier_root, cluster)
    )
    single = store.open_store(Settings(repo=tier_root / "feature_repo"))
    for fs in (tiered, single):
        store.apply(fs)
        store.materialize(fs, end)
    return tiered, single


def _rows(project: Project, n: int = 40) -> list[dict]:
    tx = project.transactions
    picked = tx.iloc[np.random.default_rng(3).choice(len(tx), size=n, replace=False)]
    return [
        {"user_id": int(r.user_id), "merchant_id": int(r.merchant_id), "amount": float(r.amount)}
        for r in picked.itertuples()
    ]


def test_tiered_values_equal_a_single_store(stores, batch_done: Project) -> None:
    tiered, single = stores
    rows = _rows(batch_done)
    service = tiered.get_feature_service(SERVICE)
    got = tiered.get_online_features(features=service, entity_rows=rows).to_dict(
        include_event_timestamps=True
    )
    want = single.get_online_features(
        features=single.get_feature_service(SERVICE), entity_rows=rows
    ).to_dict(include_event_timestamps=True)
    assert got == want
    assert sum(v is not None for v in got["user_txn_count_30d"]) > 10


def test_each_view_lives_in_the_tier_its_tag_names(stores, tier_root, cluster, batch_done) -> None:
    tiered, _ = stores
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], password=cluster.password)
    lite = sqlite3.connect(tier_root / "data" / "scylla_stand_in.db")
    tables = {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # the sampled users may have no payment in the last hour at some times of day (the
    # velocity views' TTL): the fresh user paid 3 minutes before the project's "now"
    users = sorted({r["user_id"] for r in _rows(batch_done)} | {FRESH_USER})

    views = {v.name: v for v in tiered.list_feature_views()}
    seen = {"redis": 0, "scylla": 0}
    for name, view in views.items():
        tier = tier_of(view)
        table = f"hotpath_{name}"
        if tier == "redis":
            assert table not in tables, name
        else:
            assert tier == "scylla" and table in tables, name
            assert lite.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0] > 0, name
        if [e for e in view.entities] != ["user"]:
            continue
        field = layout.feature_field(name, view.features[0].name)
        stored = [client.hget(layout.redis_key(tiered, view, (u,)), field) for u in users]
        if tier == "redis":
            assert any(stored), name
        else:
            assert not any(stored), name  # never in Redis
        seen[tier] += 1
    assert seen["redis"] and seen["scylla"]


def _at_request(want: dict, single, rows: list[dict], now: float) -> None:
    """``want``'s request-time features (windows ending at the request, which Feast's SDK
    answers with the last-event row) replaced by the single store's answer at ``now``: the
    tiers must not change them (tests/test_request_time.py checks them against pandas)."""
    from serving.online_features import OnlineFeatures

    at_request = {
        f.name
        for v in single.list_feature_views()
        if "hotpath.request_time" in (v.tags or {})
        for f in v.features
    }
    ref = OnlineFeatures(single, SERVICE).read(rows, now)
    for name in at_request & set(want):
        want[name] = [vec.values[name] for vec in ref]


def test_fast_path_reads_both_tiers_like_feast(stores, batch_done: Project) -> None:
    from serving.online_features import OnlineFeatures

    tiered, single = stores
    fast = OnlineFeatures(tiered, SERVICE)
    assert len(fast._backends) == 2
    rows = _rows(batch_done) + [{"user_id": 123_456_789, "merchant_id": 1, "amount": 1.0}]
    want = tiered.get_online_features(
        features=tiered.get_feature_service(SERVICE), entity_rows=rows
    ).to_dict()
    now = time.time()
    _at_request(want, single, rows, now)
    for i, vec in enumerate(fast.read(rows, now)):
        for name in fast.feature_names:
            assert vec.values[name] == want[name][i], (name, rows[i])


def test_freshness_reads_each_tier(stores, tier_root, batch_done: Project) -> None:
    """``hotpath validate freshness`` on a tiered store: each view's newest value is read
    from the tier holding it (Redis Cluster, SQLite standing in for ScyllaDB); all pass
    just after materialization, and the daily views of both tiers are reported over age
    three days later."""
    from validation.freshness import check_freshness

    tiered, _ = stores
    repo = tier_root / "feature_repo"
    fresh = check_freshness(tiered, repo, now=batch_done.now + timedelta(minutes=1))
    assert all(r.ok for r in fresh), [(r.view, r.age) for r in fresh if not r.ok]
    assert all(r.newest is not None for r in fresh), [r.view for r in fresh if not r.newest]
    assert {tier_of(tiered.get_feature_view(r.view)) for r in fresh} == {"redis", "scylla"}
    later = batch_done.now + timedelta(days=3)  # nothing was loaded for three days
    stale = {r.view: r for r in check_freshness(tiered, repo, now=later) if not r.ok}
    daily = {"user_spending_stats", "merchant_risk_stats", "user_merchant_history"}
    assert daily <= set(stale), sorted(stale)
    assert tier_of(tiered.get_feature_view("user_merchant_history")) == "scylla"
    for name in daily:
        r = stale[name]
        assert r.age is not None and r.max_staleness is not None and r.age > r.max_staleness


def test_keys_expire_after_their_views_ttl(stores, tier_root, cluster, monkeypatch) -> None:
    tiered, _ = stores
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], password=cluster.password)
    source = tiered.get_feature_view("user_velocity").batch_source
    probe = FeatureView(
        name="ttl_probe",
        entities=[tiered.get_entity("user")],
        ttl=timedelta(seconds=2),
        schema=[Field(name="x", dtype=Int64)],
        source=source,
        tags={"online_store": "redis"},
    )
    entity = EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=4242)])
    key = layout.redis_key(tiered, probe, (4242,))
    feast_write(tiered, probe, [(entity, {"x": ValueProto(int64_val=1)}, datetime.now(UTC), None)])
    assert client.exists(key) == 1
    assert 1 <= client.ttl(key) <= 3
    # a naive event time is UTC, as Feast reads it, whatever this machine's time zone
    naive = layout.redis_key(tiered, probe, (4243,))
    entity = EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=4243)])
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        now = datetime.now(UTC).replace(tzinfo=None)
        feast_write(tiered, probe, [(entity, {"x": ValueProto(int64_val=1)}, now, None)])
    finally:
        monkeypatch.undo()
        time.tzset()
    assert 1 <= client.ttl(naive) <= 3
    time.sleep(3.5)
    assert client.exists(key) == client.exists(naive) == 0
    # a real view: its keys expire at the newest event time + the view's TTL
    view = tiered.get_feature_view("merchant_risk_stats")
    mkey = layout.redis_key(tiered, view, (1,))
    stamp = layout.decode_stamp(client.hget(mkey, layout.ts_field(view.name)))
    expected = int(stamp) + view.ttl.total_seconds() - time.time()
    assert abs(client.ttl(mkey) - expected) <= 3


def test_stream_writes_reach_the_cluster_tier(stores, cluster) -> None:
    """The streaming flow's writer on a tiered store: compare-and-set on the Redis Cluster
    tier (a correction at the same event time overwrites, an older row does not), and the
    key's expiry set like the store's own writes."""
    from pipelines.stream.aggregates import key_groups
    from pipelines.stream.flow import stream_views
    from pipelines.stream.sinks import OnlineWriter, Row

    tiered, _ = stores
    views = stream_views(tiered)
    writer = OnlineWriter(tiered, views)
    (group,) = [g for g in key_groups(views) if g.keys == ("user_id",)]
    now_us = int(time.time() * 1e6)

    def row(ts: int, n: int, user: int = 777_001) -> Row:
        values = tuple(n if a.function.startswith("count") else n * 1.5 for a in group.aggs)
        return Row(group.keys, (user,), ts, values, 0.0)

    def read() -> int:
        got = tiered.get_online_features(
            features=["user_velocity:user_txn_count_5m"], entity_rows=[{"user_id": 777_001}]
        ).to_dict()
        return got["user_txn_count_5m"][0]

    writer.write([row(now_us, 3)])
    assert read() == 3
    writer.write([row(now_us, 4)])  # a late event's correction: same instant, new values
    assert read() == 4
    writer.write([row(now_us - 10_000_000, 9)])  # older: ignored
    assert read() == 4
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], password=cluster.password)
    user_view = tiered.get_feature_view(group.views[0].name)
    key = layout.redis_key(tiered, user_view, (777_001,))
    longest = max(v.ttl_us / 1e6 for v in group.views)
    assert abs(client.ttl(key) - longest) <= 3
    # rows already past a view's TTL do not reach it: 2 hours old (the 1-hour view stays
    # empty, the 24-hour one is written), 5 days old (nothing written, no key at all)
    hour = 3600 * 1_000_000
    writer.write([row(now_us - 2 * hour, 5, 777_002)])
    writer.write([row(now_us - 120 * hour, 5, 777_003)])
    got = tiered.get_online_features(
        features=[
            "user_velocity:user_txn_count_5m",
            "user_merchant_spread:user_distinct_merchants_24h",
        ],
        entity_rows=[{"user_id": 777_002}, {"user_id": 777_003}],
    ).to_dict()
    assert got["user_txn_count_5m"] == [None, None]
    assert got["user_distinct_merchants_24h"] == [5, None]
    assert not client.exists(layout.redis_key(tiered, user_view, (777_003,)))  # five days old


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOTPATH_")}
    return env | extra


def _cli(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--repo", str(repo), *args],
        env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_doctor_and_bad_configs_fail_at_start_up(tier_root, cluster) -> None:
    repo = tier_root / "feature_repo"
    closed = f"127.0.0.1:{free_port()}"
    cases = [
        (("--profile", "redis-cluster", "apply"), {"HOTPATH_REDIS_CLUSTER_NODES": closed},
         "Redis unreachable at " + closed),
        (("--profile", "redis-cluster", "apply"),
         {"HOTPATH_REDIS_CLUSTER_NODES": cluster.nodes, "HOTPATH_REDIS_PASSWORD": "wrong"},
         "refused the credentials"),
        (("--profile", "production", "apply"),
         {"HOTPATH_REDIS_CLUSTER_NODES": cluster.nodes, "HOTPATH_REDIS_PASSWORD": cluster.password,
          "HOTPATH_SCYLLA_HOST": "127.0.0.1"},
         "scylla tier: scylladb unreachable at 127.0.0.1:9042"),
        (("--profile", "redis-cluster", "doctor"), {"HOTPATH_REDIS_CLUSTER_NODES": "nonsense"},
         "not a Redis Cluster node"),
    ]  # fmt: skip
    # independent commands, run at once: their start-ups overlap
    ok, *failed = concurrently(
        partial(
            _cli, repo, "--profile", "redis-cluster", "doctor",
            HOTPATH_REDIS_CLUSTER_NODES=cluster.nodes, HOTPATH_REDIS_PASSWORD=cluster.password,
        ),
        *(partial(_cli, repo, *args, **env) for args, env, _ in cases),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "Redis Cluster 7." in ok.stdout and "round trip" in ok.stdout
    for (args, _, fragment), r in zip(cases, failed, strict=True):
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert fragment in r.stdout + r.stderr, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr


def test_an_unset_credential_is_no_credential_never_the_placeholder() -> None:
    """The production profile's ``${HOTPATH_SCYLLA_USERNAME}`` / ``_PASSWORD`` when the
    variables are unset (Feast leaves the placeholder as written): no credential is sent;
    one without the other, or any other unset variable, is a one-line error naming it."""
    yaml = (ROOT / "feature_repo" / "feature_store.production.yaml").read_text()
    assert '"${HOTPATH_SCYLLA_USERNAME}"' in yaml and '"${HOTPATH_SCYLLA_PASSWORD}"' in yaml
    tier = {
        "type": "scylladb", "hosts": ["127.0.0.1"], "keyspace": "k",
        "username": "${HOTPATH_SCYLLA_USERNAME}", "password": "${HOTPATH_SCYLLA_PASSWORD}",
    }  # fmt: skip
    unset = store_config(tier)
    assert (unset.username, unset.password) == (None, None)
    both = store_config(tier | {"username": "svc", "password": "pw"})
    assert (both.username, both.password) == ("svc", "pw")
    with pytest.raises(UnsetVariableError, match=r"username given without password: \$\{HOTP"):
        store_config(tier | {"username": "svc"})
    with pytest.raises(UnsetVariableError, match=r"hosts: \$\{HOTPATH_SCYLLA_HOST\} is not set"):
        store_config(tier | {"hosts": ["${HOTPATH_SCYLLA_HOST}"]})


def test_unknown_tier_tag_fails_at_apply(tier_root, cluster) -> None:
    repo = tier_root.parent / "bad_repo" / "feature_repo"
    shutil.copytree(tier_root / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
    features = repo / "features.py"
    text = features.read_text()
    assert '"online_store": "scylla"' in text
    features.write_text(text.replace('"online_store": "scylla"', '"online_store": "ssd"', 1))
    (repo.parent / "data").symlink_to(tier_root / "data")
    fs = FeatureStore(repo_path=str(repo), fs_yaml_file=_tiered_yaml(repo.parent, cluster))
    with pytest.raises(HotpathError, match="tag 'ssd' names no tier"):
        store.apply(fs)


def test_a_killed_master_fails_over_without_a_wrong_value(stores, cluster, batch_done) -> None:
    """Last in this module. kill -9 of a master while the serving fast path reads from two
    threads and the stream's writer writes from a third: each read either answers exactly
    what the single store answers or fails (the service's rule-based fallback), the
    master's replica takes over, and the same reader answers again without a restart; the
    writer rides through (it retries), and what it wrote last is what is read."""
    from pipelines.stream.aggregates import key_groups
    from pipelines.stream.flow import stream_views
    from pipelines.stream.sinks import OnlineWriter, Row
    from serving.online_features import OnlineFeatures

    tiered, single = stores
    rows = _rows(batch_done, 60)
    want = single.get_online_features(
        features=single.get_feature_service(SERVICE), entity_rows=rows
    ).to_dict()
    now = time.time()
    _at_request(want, single, rows, now)
    fast = OnlineFeatures(tiered, SERVICE)
    views = stream_views(tiered)
    writer = OnlineWriter(tiered, views)
    (group, *_) = key_groups(views)
    users = [tuple(770_000 + u for _ in group.keys) for u in range(50)]  # on every master
    counts = {"right": 0, "error": 0, "wrong": 0, "writes": 0, "write_errors": 0}
    last_error = [0.0]
    stop_at = [float("inf")]
    lock = threading.Lock()
    written = [0]

    def read(offset: int) -> None:
        i = offset
        while time.monotonic() < stop_at[0]:
            j = i % len(rows)
            i += 1
            try:
                (vec,) = fast.read([rows[j]], now)
            except Exception:  # the service answers these with its rule-based fallback
                with lock:
                    counts["error"] += 1
                    last_error[0] = time.monotonic()
                continue
            right = all(vec.values[n] == want[n][j] for n in fast.feature_names)
            with lock:
                counts["right" if right else "wrong"] += 1

    def write() -> None:
        n = 0
        while time.monotonic() < stop_at[0]:
            n += 1
            values = tuple(n if a.function.startswith("count") else n * 1.5 for a in group.aggs)
            ts = int(time.time() * 1e6)
            try:
                writer.write([Row(group.keys, k, ts, values, 0.0) for k in users])
            except Exception:
                counts["write_errors"] += 1
                continue
            counts["writes"], written[0] = counts["writes"] + 1, n

    threads = [threading.Thread(target=read, args=(k * 7,)) for k in range(2)]
    threads.append(threading.Thread(target=write))
    for t in threads:
        t.start()
    time.sleep(1)
    (victim, *_) = cluster.masters()
    killed = time.monotonic()
    cluster.kill(victim)
    stop_at[0] = killed + 8
    for t in threads:
        t.join()
    recovered = last_error[0] - killed if counts["error"] else 0.0
    print(f"failover: {counts}; reads answered again {recovered:.2f} s after kill -9")
    assert counts["wrong"] == 0, counts
    assert counts["error"] >= 1, counts  # the kill was seen
    assert recovered < 6, (recovered, counts)  # answered again, same reader, no restart
    assert victim not in cluster.masters() and len(cluster.masters()) == 3
    assert counts["write_errors"] == 0 and counts["writes"] >= 2, counts
    view = group.views[0]
    feature = next(a.name for a in view.aggs if a.function == "count")
    got = tiered.get_online_features(
        features=[f"{view.name}:{feature}"],
        entity_rows=[dict(zip(group.keys, k, strict=True)) for k in users],
    ).to_dict()
    assert got[feature] == [written[0]] * len(users), got[feature]
