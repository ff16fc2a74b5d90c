"""Request-time windows online: the stream's keyed state, Bytewax's runtime and the real
online writer fill a real redis-server (and the embedded SQLite store) with a test view's
tiles, and the serving fast path answers at injected request instants.

Expected values come from a pandas oracle over the exact events, written here from the
declared semantics (``online_store/tiles.py``'s docstring), not from the tile code: at an
instant ``t`` a window ``W`` of resolution ``R`` counts the stored events at or after
``floor(t/R)·R - W + R`` (for ``t`` at or after the key's newest event: those up to ``t``).

The events lie an hour ahead of the wall clock: a key expires (for real, in Redis) its
longest window after its last event, which must not happen while the test reads it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
import pandas as pd
import pytest
import redis
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main
from feast import FeatureService, FeatureStore, RepoConfig
from helpers import ROOT

from pipelines import declared
from pipelines.contract import use_repo
from pipelines.stream.aggregates import KeyState, key_groups, keyed_steps
from pipelines.stream.events import Event
from pipelines.stream.flow import keyed_windows
from pipelines.stream.sinks import OnlineSink, OnlineWriter
from serving.online_features import OnlineFeatures, served

S = 1_000_000
R = 10 * S  # the test view's tiles
WINDOWS = {"30s": 30 * S, "2m": 120 * S}
FUNCTIONS = ("count", "sum", "max", "min", "mean")
FEATURES = [f"rt_{f}_{w}" for w in WINDOWS for f in FUNCTIONS]
LAST_EVENT = "plain_count_2m"  # a last-event view beside it, on the same key
TTL = timedelta(seconds=20)  # shorter than every window: request-time values ignore it
LATENESS_US = 60 * S
SERVICE = "rt_service"
DB = 14


def _repo_objects() -> list:
    """A request-time view (count/sum/max/min/mean over 30 s and 2 min, 10 s tiles), a
    last-event view on the same entity, and a service reading both, declared with the
    repo's own ``aggregated_view``."""
    use_repo(ROOT / "feature_repo")
    from aggregated import PER_EVENT, Aggregation, aggregated_view
    from data_sources import transactions
    from entities import user

    aggs = [
        Aggregation("amount", f, timedelta(microseconds=w), name=f"rt_{f}_{name}")
        for name, w in WINDOWS.items()
        for f in FUNCTIONS
    ]
    rt = aggregated_view(
        name="rt_velocity", entities=[user], events=transactions, cadence=PER_EVENT,
        stream=True, aggregations=aggs, ttl=TTL, request_time=timedelta(microseconds=R),
        tags={"online_store": "redis"},
    )  # fmt: skip
    plain = aggregated_view(
        name="plain_velocity", entities=[user], events=transactions, cadence=PER_EVENT,
        stream=True, aggregations=[Aggregation("amount", "count", timedelta(minutes=2),
                                               name=LAST_EVENT)],
        ttl=TTL, tags={"online_store": "redis"},
    )  # fmt: skip
    service = FeatureService(name=SERVICE, features=[rt, plain])
    return [user, transactions, rt, plain, service]


def _store(root: Path, online: dict) -> FeatureStore:
    config = RepoConfig(
        project="rt",
        provider="local",
        registry=str(root / "registry.db"),
        online_store=online,
        offline_store={"type": "file"},
        entity_key_serialization_version=3,
    )
    fs = FeatureStore(config=config, repo_path=str(root))
    fs.apply(_repo_objects())
    return fs


@pytest.fixture(scope="module")
def stores(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], FeatureStore]]:
    """The test repo applied on a store kind, on first use: the real redis-server (db 14),
    SQLite, or the session's 3-master Redis Cluster (its keys deleted at the end: the
    cluster is shared)."""
    root = tmp_path_factory.mktemp("request_time")
    made: dict[str, FeatureStore] = {}

    def online(kind: str) -> dict:
        if kind == "redis":
            redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{DB}").flushdb()
            host = redis_url.split("//", 1)[1].rsplit("/", 1)[0]
            return {"type": "redis", "connection_string": f"{host},db={DB}"}
        if kind == "sqlite":
            return {"type": "sqlite", "path": str(root / "online.db")}
        cluster = request.getfixturevalue("redis_cluster")
        return {
            "type": "redis",
            "redis_type": "redis_cluster",
            "connection_string": f"{cluster.nodes},password={cluster.password}",
        }

    def store(kind: str) -> FeatureStore:
        if kind not in made:
            (root / kind).mkdir()
            made[kind] = _store(root / kind, online(kind))
        return made[kind]

    yield store
    if "redis_cluster" in made:
        cluster = request.getfixturevalue("redis_cluster")
        client = redis.RedisCluster("127.0.0.1", cluster.ports[0], password=cluster.password)
        for key in client.scan_iter():
            if key.endswith(b"rt"):  # this project's entity keys (Feast's: key + project)
                client.delete(key)


# ------------------------------------------------------------------ the oracle
def oracle(events: pd.DataFrame, user: int, t: int) -> dict[str, float | int | None]:
    """Each feature of ``user`` at instant ``t`` (µs) over ``events`` (those the store has
    been given: ``user_id``, ``ts``, ``amount``), by the declared semantics; each window's
    events are also checked to lie within its true window ``(t - W, t]``."""
    mine = events[events.user_id == user]
    out: dict[str, float | int | None] = {}
    for name, w in WINDOWS.items():
        lower = t // R * R - w + R
        inside = mine[mine.ts >= lower]
        assert (inside.ts > t - w).all()  # never an event older than the window
        x = inside.amount
        empty = x.empty
        out[f"rt_count_{name}"] = len(x)
        out[f"rt_sum_{name}"] = float(x.sum())
        out[f"rt_max_{name}"] = None if empty else float(x.max())
        out[f"rt_min_{name}"] = None if empty else float(x.min())
        out[f"rt_mean_{name}"] = None if empty else float(x.mean())
    return out


def _same(got: dict, want: dict) -> bool:
    return all(
        got[k] is None if v is None else got[k] == pytest.approx(v, rel=1e-12, abs=1e-9)
        for k, v in want.items()
    )


def _check(fast: OnlineFeatures, events: pd.DataFrame, users: list[int], t: int) -> None:
    """The fast path at instant ``t`` equals the oracle for each user; counts and sums are
    never missing (an empty window is 0); the request-time view never expires."""
    read = fast.read_served([{"user_id": u} for u in users], now=t / S)
    values, ages = [read.row(i) for i in range(read.n)], [read.ages_of(i) for i in range(read.n)]
    for u, got, age in zip(users, values, ages, strict=True):
        want = oracle(events, u, t)
        assert _same(got, want), (u, t, {k: (got[k], v) for k, v in want.items()})
        assert all(got[f"rt_{f}_{w}"] is not None for f in ("count", "sum") for w in WINDOWS)
        assert isinstance(got["rt_count_2m"], int)
        if age["rt_velocity"] is not None:  # since the last event (SQLite: whole seconds)
            since = t / S - events.ts[events.user_id == u].max() / S
            assert age["rt_velocity"] == pytest.approx(since, abs=1.001)


def _edges(events: pd.DataFrame, start: int, end: int) -> list[int]:
    """Request instants in ``[start, end)``: ±1 µs around the tile edges of the longest
    window after ``start`` and around every instant a stored event's tile leaves a window,
    a point in between, and the ends themselves."""
    out = {start, end - 1, (start + end) // 2}
    for k in range(start // R, start // R + max(WINDOWS.values()) // R + 2):
        out |= {k * R - 1, k * R, k * R + 1}
    for ts in events.ts:
        for w in WINDOWS.values():
            leaves = (ts // R) * R + w
            out |= {leaves - 1, leaves, leaves + 1}
    return sorted(t for t in out if start <= t < end)


def _base() -> int:
    """A tile edge an hour ahead of the wall clock (see the module docstring)."""
    return (int(time.time() * S) + 3600 * S) // R * R


def _as_events(df: pd.DataFrame) -> list[Event]:
    return [Event(int(r.user_id), 1, float(r.amount), int(r.ts), 0.0) for r in df.itertuples()]


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("kind", ["redis", "sqlite", "redis_cluster"])
def test_request_instants_between_events_equal_pandas(stores, kind: str) -> None:
    """Events given one at a time to the keyed state and written by the real writer;
    after each, the fast path at instants up to the next event (on and ±1 µs around tile
    and window edges, and an hour on) equals pandas over the events given so far. A burst
    after an hour's quiet counts at once; an out-of-order event within the lateness lands
    in its own tile; a late one is counted nowhere; an empty window reads 0, not missing;
    Feast's SDK still reads the stored last-event row."""
    fs = stores(kind)
    views = [v for v in declared.from_store(fs) if v.streamed]
    (step,) = keyed_steps(key_groups(views))
    clock = [0.0]
    writer = OnlineWriter(fs, views, clock=lambda: clock[0])
    fast = OnlineFeatures(fs, SERVICE)
    b, u = _base(), 7_000 + ["redis", "sqlite", "redis_cluster"].index(kind)
    arrivals = [  # (user, µs after b, amount), in arrival order
        (u, 0, 5.0), (u, R - 1, 7.25), (u, R, 1.5),  # a tile's last µs and the next's first
        (u, 25 * S, 3.0), (u, 25 * S, 4.0),  # a tie
        (u, 41 * S, 10.0), (u, 33 * S, 2.5),  # out of order, within the lateness (own tile)
        (u, 119 * S + 1, 0.25),
        (u, 41 * S - LATENESS_US - 1, 99.0),  # late: more than the lateness behind
        (u, 3 * 3600 * S, 8.0),  # an hour and more of quiet, then a burst
        (u, 3 * 3600 * S + 3, 1.0), (u, 3 * 3600 * S + 4 * S, 6.5),
    ]  # fmt: skip
    states: dict[str, KeyState] = {}
    given = pd.DataFrame(columns=["user_id", "ts", "amount"]).astype(
        {"user_id": "int64", "ts": "int64", "amount": "float64"}
    )
    for n, (user, at, amount) in enumerate(arrivals):
        e = Event(user, 1, amount, b + at, 0.0)
        state = states.setdefault(step.own.key(e), KeyState(step))
        rows, late = state.apply([e], LATENESS_US)
        if amount == 99.0:
            assert rows == [] and [x.event for x in late] == [e]
            continue
        assert late == []
        seen = max(b + at, int(given.ts.max()) if len(given) else 0)  # the key's newest
        quiet = fast.read_served([{"user_id": user}], now=seen / S).row(0)
        before = quiet["rt_count_30s"]
        clock[0] = max(r.ts_us for r in rows) / S
        writer.write(rows)
        given.loc[len(given)] = [user, b + at, amount]
        newest = int(given.ts.max())
        after = fast.read_served([{"user_id": user}], now=newest / S).row(0)
        if at == 33 * S:  # into its tile (3), which the 30 s window at 41 s counts
            assert after["rt_count_30s"] == before + 1 == 4
        if at == 3 * 3600 * S:  # the burst's first event is counted at its own instant
            assert quiet["rt_count_2m"] == 0 and quiet["rt_sum_2m"] == 0.0  # empty: 0
            assert quiet["rt_max_2m"] is None and quiet["rt_mean_30s"] is None  # missing
            assert after["rt_count_30s"] == 1 and after["rt_max_2m"] == 8.0
        following = [b + a for _, a, x in arrivals[n + 1 :] if x != 99.0 and b + a > newest]
        end = min(following, default=newest + 3 * 120 * S)
        instants = _edges(given, newest, end)
        instants += [newest + 3600 * S] if not following else []
        for t in instants:
            _check(fast, given, [user], t)
    # Feast's SDK serves the stored row: the windows at the key's newest event (the tiles
    # beside it in the same hash / table do not disturb it)
    stored = fs.get_online_features(
        features=[f"rt_velocity:{f}" for f in FEATURES], entity_rows=[{"user_id": user}]
    ).to_dict()
    assert _same({f: stored[f][0] for f in FEATURES}, oracle(given, user, int(given.ts.max())))


def test_the_bytewax_flow_writes_tiles_the_fast_path_reads(stores) -> None:
    """Several users' payments, delivered out of order within the lateness, through Bytewax's
    runtime (the flow's keyed step and online sink, the real writer, Redis): at request
    instants after the last payment (edges ±1 µs, a day later) the fast path equals pandas;
    an unknown user reads 0; the last-event view beside it keeps its TTL; and the stored
    row (what Feast's SDK serves) is the value at the user's last payment."""
    fs = stores("redis")
    views = [v for v in declared.from_store(fs) if v.streamed]
    (step,) = keyed_steps(key_groups(views))
    rng = random.Random(18)
    b, users = _base(), list(range(8_000, 8_006))
    times = sorted(rng.randrange(0, 300 * S) for _ in range(120))
    events = pd.DataFrame(
        {
            "user_id": [rng.choice(users) for _ in times],
            "ts": [b + t for t in times],
            "amount": [round(rng.uniform(0, 50), 2) for _ in times],
        }
    )
    events.loc[len(events)] = [users[0], b + 300 * S + 2 * R, 12.0]  # the newest: a tile edge
    order = events.assign(key=events.ts + [rng.randrange(0, 20 * S) for _ in range(len(events))])
    delivered = order.sort_values("key")
    last = events.ts.max()
    flow = Dataflow("request_time")
    inp = op.input("events", flow, TestingSource(_as_events(delivered), batch_size=7))
    parsed = op.map("as_parsed", inp, lambda e: ("id", e))
    out = keyed_windows(step, parsed, LATENESS_US)
    op.output("online", out, OnlineSink(lambda: OnlineWriter(fs, views, clock=lambda: last / S)))
    run_main(flow)
    fast = OnlineFeatures(fs, SERVICE)
    readers = [*users, 999_999]  # and one never seen
    for t in _edges(events, int(last), int(last) + 2 * 120 * S) + [last + 86_400 * S]:
        _check(fast, events, readers, t)
    late = fast.read_served([{"user_id": u} for u in readers], now=last / S + 30)
    assert [v is None for v in late.values[LAST_EVENT][:-1]] == [True] * len(users)  # TTL: 20 s
    now = fast.read_served([{"user_id": u} for u in readers], now=last / S)
    assert now.row(0)[LAST_EVENT] is not None and now.row(0)["rt_count_30s"] >= 1
    (vec,) = fast.read([{"user_id": users[0]}], now=last / S + 86_400)
    assert served(vec, fast.ttl_of(), last / S + 86_400) == {LAST_EVENT}
    assert vec.values["rt_count_2m"] == 0 and vec.values["rt_sum_30s"] == 0.0
    stored = fs.get_online_features(
        features=[f"rt_velocity:{f}" for f in FEATURES], entity_rows=[{"user_id": users[0]}]
    ).to_dict()
    mine = events[events.user_id == users[0]]
    at_last = oracle(mine, users[0], int(mine.ts.max()))
    assert _same({k: v[0] for k, v in stored.items()}, at_last)
