"""What every command shares: the settings from the global options, the feature store and
the Spark session opened from them, option parsing and how a step is printed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import typer
from pydantic import BaseModel

from pipelines.console import age
from pipelines.errors import HotpathError
from pipelines.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import SparkSession


class Hotpath:
    """The one context a command opens things through (``ctx.obj``, set by the global
    options); imports stay inside, so a command pays only for what it opens."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def store(self, applied: bool = True) -> FeatureStore:
        """The active profile's FeatureStore, its online store reached; with ``applied``,
        refused while nothing is registered."""
        from pipelines import store

        fs = store.open_store(self.settings)
        if applied and not fs.list_feature_views():
            raise HotpathError("nothing registered on this profile yet: run `hotpath apply` first")
        return fs

    def spark(self) -> SparkSession:
        """The Spark session (Feast's Spark offline store and engine reuse it)."""
        from pipelines.spark import spark_session

        return spark_session(self.settings.spark.master, self.settings.spark.driver_memory)


def hotpath(ctx: typer.Context) -> Hotpath:
    return ctx.obj


def default_of(model: type[BaseModel], field: str) -> str:
    """A settings default, for an option's help (the option itself defaults to None and
    falls back to the settings, so the environment is honoured)."""
    default = model.model_fields[field].default
    return ",".join(map(str, default)) if isinstance(default, list) else str(default)


@contextmanager
def step(title: str) -> Iterator[None]:
    """Print a step's title, then how long it took."""
    typer.echo(f"==> {title}")
    t0 = time.perf_counter()
    yield
    typer.echo(f"    done in {time.perf_counter() - t0:.1f}s")


def split(value: str | None, sep: str = ",") -> list[str] | None:
    """A list option given as one separated string (None: not given)."""
    return None if value is None else [x.strip() for x in value.split(sep) if x.strip()]


def parse_date(value: str | None, what: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HotpathError(f"{what} must be a date like 2026-01-31, got {value!r}") from None


def parse_time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise HotpathError(
            f"{what} must be an ISO time like 2026-01-31T12:00, got {value!r}"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def print_vector(values: list[Any], echo: Callable[[str], None] = typer.echo) -> None:
    """One line per feature: value, age (or request-time), and the model's default."""
    width = max(len(v.name) for v in values)
    for v in values:
        shown = (
            "—"
            if v.value is None
            else (f"{v.value:.6g}" if isinstance(v.value, float) else v.value)
        )
        when = "request-time" if v.value is not None and v.age_s is None else age(v.age_s)
        if v.default is not None:
            when += f" (model uses default {v.default:g})"
        echo(f"      {v.name:<{width}}  {shown!s:>12}  {when}")
