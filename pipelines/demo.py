"""The last step of ``hotpath demo``: the main job, done the way a client sees it.

Starts ``hotpath serve`` (the in-process ONNX backend) as a separate process on a free
loopback port, waits for ``/ready``, posts three payments drawn from the demo's data to
``/predict`` (a clean one, a suspicious one, one from a user nobody has seen), prints each
decision with its reasons, score, fallback flag and feature ages, stops the service with
SIGTERM, and prints the commands to do it by hand.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import console
from pipelines.console import age
from pipelines.errors import HotpathError
from pipelines.settings import DEFAULT_REPO, Settings

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Payment:
    """One payment the demo scores, with what makes it interesting."""

    kind: str  # clean, suspicious, unknown user
    why: str
    user_id: int
    merchant_id: int
    amount: float

    @property
    def body(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "merchant_id": self.merchant_id, "amount": self.amount}


def payments(raw_dir: Path) -> list[Payment]:
    """A clean, a suspicious and an unknown user's payment, from the raw data: the recent
    payer with the longest history pays their usual merchant their median amount; then 20x
    their average at the riskiest merchant they never used; then a user id past every one
    in the data pays the same as the first."""
    import pandas as pd

    columns = ["user_id", "merchant_id", "amount", "event_timestamp", "is_fraud"]
    tx = pd.read_parquet(raw_dir / "transactions", columns=columns)
    history = tx.user_id.value_counts()
    recent = tx.nlargest(50, "event_timestamp").user_id.unique()
    user = int(max(recent, key=lambda u: history[u]))
    theirs = tx[tx.user_id == user]
    usual_merchant = int(theirs.merchant_id.mode()[0])
    usual_amount = round(float(theirs.amount.median()), 2)
    merchants = tx.groupby("merchant_id").is_fraud.agg(["mean", "size"])
    strangers = merchants.drop(index=theirs.merchant_id.unique())
    candidates = strangers[strangers["size"] >= 20]
    candidates = candidates if len(candidates) else strangers if len(strangers) else merchants
    risky = int(candidates["mean"].idxmax())
    big = round(20 * float(theirs.amount.mean()), 2)
    rate = candidates.loc[risky, "mean"]
    return [
        Payment("clean", "their usual merchant, their usual amount", user, usual_merchant,
                usual_amount),
        Payment("suspicious", f"20x their average, at a merchant new to them with "
                f"{rate:.0%} fraud", user, risky, big),
        Payment("unknown user", "a user id the data has never seen", int(tx.user_id.max()) + 1,
                usual_merchant, usual_amount),
    ]  # fmt: skip


def global_options(settings: Settings) -> list[str]:
    """The ``hotpath`` options that select this repo and profile (defaults left out)."""
    argv = []
    if settings.repo.resolve() != DEFAULT_REPO.resolve():
        argv += ["--repo", str(settings.repo)]
    if settings.profile != "embedded":
        argv += ["--profile", settings.profile]
    if settings.profile == "redis":
        argv += ["--redis-url", settings.redis_url]
    elif settings.profile in ("redis-cluster", "production"):
        argv += ["--redis-cluster-nodes", settings.redis_cluster_nodes]
    return argv


@contextmanager
def running_service(
    settings: Settings, log: Path | None, timeout_s: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``hotpath serve`` in a child process, yielded with its URL once ``/ready`` answers
    200; stopped with SIGTERM (killed after 30 s) on exit. Its output goes to ``log``
    (None: this terminal). HotpathError with the log's last line if it exits or is not
    ready in ``timeout_s``."""
    from serving.triton_local import free_port

    port = free_port()
    argv = [sys.executable, "-m", "pipelines.cli", *global_options(settings)]
    argv += ["--verbose", "serve"] if console.verbose() else ["serve"]
    argv += ["--port", str(port), "--backend", "onnx"]
    out = log.open("w") if log else None
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while _get(f"{url}/ready") != 200:
            if proc.poll() is not None:
                raise HotpathError(f"`hotpath serve` exited ({proc.returncode}){_last_line(log)}")
            if time.monotonic() > deadline:
                raise HotpathError(
                    f"`hotpath serve` not ready in {timeout_s:.0f}s{_last_line(log)}"
                )
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if out:
            out.close()


def _get(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return None


def _last_line(log: Path | None) -> str:
    lines = log.read_text().strip().splitlines() if log and log.exists() else []
    return f": {lines[-1]} (log: {log})" if lines else ""


def predict(url: str, payment: Payment, api_key: str | None = None) -> dict[str, Any]:
    """POST one payment to ``/predict``; the answer's JSON body."""
    headers = {"content-type": "application/json"}
    if api_key:
        headers["x-api-key"] = api_key
    request = urllib.request.Request(
        f"{url}/predict", json.dumps(payment.body).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise HotpathError(f"/predict answered {e.code}: {e.read().decode()[:200]}") from None


def predict_over_http(
    settings: Settings, echo: Echo = print
) -> list[tuple[Payment, dict[str, Any]]]:
    """Serve the latest model, score :func:`payments` over HTTP, print each answer, stop
    the service, print how to do it by hand; the payments with their answers. The
    service's own output goes to ``data/demo-serve.log`` unless ``--verbose``."""
    key = settings.serving.api_key.get_secret_value() if settings.serving.api_key else None
    log = None if console.verbose() else settings.data_dir / "demo-serve.log"
    t0 = time.perf_counter()
    answers = []
    with running_service(settings, log) as (url, proc):
        echo(f"    `hotpath serve` ready on {url} in {time.perf_counter() - t0:.1f}s")
        for p in payments(settings.raw_dir):
            answer = predict(url, p, key)
            answers.append((p, answer))
            _print_answer(p, answer, echo)
    echo(f"    service stopped (SIGTERM, exit code {proc.returncode})")
    clean = answers[0][0]
    by_hand = shlex.join(["hotpath", *global_options(settings), "serve"])
    curl = shlex.join(
        ["curl", "-s", "http://127.0.0.1:8080/predict", "-H", "content-type: application/json",
         *(["-H", "x-api-key: $HOTPATH_SERVING_API_KEY"] if key else []),
         "-d", json.dumps(clean.body)]
    )  # fmt: skip
    echo("    to do it yourself, in two terminals:")
    echo(f"      {by_hand}")
    echo(f"      {curl}")
    return answers


def _print_answer(p: Payment, a: dict[str, Any], echo: Echo) -> None:
    score = "none" if a["score"] is None else f"{a['score']:.3f}"
    by = "the fallback rule" if a["fallback"] else f"{a['model']} v{a['model_version']}"
    ages = ", ".join(f"{view} {age(s)}" for view, s in a["feature_age_s"].items())
    missing = a["missing_features"]
    lines = [
        f"{p.kind}: user {p.user_id} pays {p.amount:.2f} to merchant {p.merchant_id} ({p.why})",
        f"  -> {a['decision']}, score {score}, fallback {str(a['fallback']).lower()} "
        f"({by}, {a['latency_ms'].get('total', 0):.1f} ms)",
        f"  reasons: {', '.join(a['reasons']) or 'none'}",
        f"  feature ages: {ages}",
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        lines.append(f"  missing (the model used defaults): {', '.join(missing[:3])}{more}")
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        echo(textwrap.fill(line, 96, initial_indent="    ", subsequent_indent=indent + "  "))
