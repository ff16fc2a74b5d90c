"""``hotpath demo`` as a newcomer runs it, its output piped (not a terminal): our progress
lines only (no Spark WARN lines, no Python warnings, no escape codes), ending with real
``/predict`` answers from a service it started and stopped."""

from __future__ import annotations

import re

from helpers import Background

# "-> approve, score 0.004, fallback false (fraud_detection v1, 1.1 ms)"
ANSWER = r"\n      -> (approve|review|decline), score ([0-9.]+|none), fallback (true|false) "


def test_demo_is_quiet_and_ends_with_predictions(demo_run: Background) -> None:
    """``demo_run`` (conftest) started ``hotpath demo --rows 3000 --days 5`` on a fresh copy
    of the repo when the session began; this waits for it to end."""
    proc = demo_run.result(timeout=900)
    data = demo_run.stdout.parent / "data"
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    steps = ("generate", "spark batch backfill", "feast apply", "materialize", "train on")
    for step in (*steps, "published version 1", "demo finished"):
        assert step in out, f"step {step!r} missing:\n{out[-3000:]}"
    assert "user_txn_count_30d" in out and "request-time" in out
    assert (data / "online_store.db").exists()
    model = data / "model_repository" / "fraud_detection" / "1" / "model.onnx"
    assert model.exists()
    assert "\x1b[" not in out, "escape codes in piped output"
    noise = [line for line in out.splitlines() if re.search(r"\bWARN|Warning\b|warnings\.", line)]
    assert not noise, noise
    answers = {}
    for kind in ("clean", "suspicious", "unknown user"):
        block = rf"\n    {kind}: user \d+ pays [0-9.]+ to merchant \d+ (?:(?!\n    \S).)*?"
        found = re.search(block + ANSWER, out, re.S)
        assert found, f"no answer for the {kind} payment:\n{out[-3000:]}"
        answers[kind] = found.groups()
    assert answers["clean"][1] != "none" and answers["clean"][2] == "false"
    assert answers["suspicious"][1] != "none" and answers["suspicious"][2] == "false"
    tail = out[out.index("\n    clean: ") :]
    assert "reasons: " in tail and "feature ages: user_" in tail
    assert "service stopped (SIGTERM, exit code 0)" in tail
    assert "curl -s http://127.0.0.1:8080/predict" in tail
