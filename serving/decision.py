"""From a score (or, without one, from rules) to approve / review / decline, with reasons.

The rules are the repo's declaration (``decision_policy.py``), read once by path; no
feature is named here.
"""

from __future__ import annotations

import operator
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

Decision = Literal["approve", "review", "decline"]
POLICY_DECLARATION = "decision_policy.py"
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}


def decide(score: float, review: float, decline: float) -> Decision:
    if score >= decline:
        return "decline"
    if score >= review:
        return "review"
    return "approve"


@dataclass(frozen=True)
class Policy:
    """Reason rules and the fallback rule (see the declaration's docstring)."""

    rules: tuple[tuple[str, str, str, Any], ...]
    decline_when: tuple[frozenset[str], ...]
    review_ignores: frozenset[str]
    review_amount: float

    def reasons(self, values: dict[str, Any]) -> list[str]:
        """Reason codes a reviewer understands, from the features behind the decision."""
        out = []
        for code, feature, comparison, threshold in self.rules:
            value = values.get(feature)
            if comparison == "missing":
                hit = value is None
            else:
                hit = value is not None and _COMPARE[comparison](value, threshold)
            if hit:
                out.append(code)
        return out

    def fallback(self, values: dict[str, Any], amount: float) -> Decision:
        """The rule used when the model is unavailable or late: conservative, explainable."""
        codes = set(self.reasons(values))
        if any(when <= codes for when in self.decline_when):
            return "decline"
        if codes - self.review_ignores or amount >= self.review_amount:
            return "review"
        return "approve"


@cache
def load_policy(repo: Path) -> Policy:
    """The policy ``repo`` declares; ValueError naming the file when missing or malformed."""
    path = repo.resolve() / POLICY_DECLARATION
    if not path.exists():
        raise ValueError(f"no decision policy declaration at {path}")
    try:
        ns = runpy.run_path(str(path))
        rules = tuple((str(c), str(f), str(op), t) for c, f, op, t in ns["REASONS"])
        policy = Policy(
            rules=rules,
            decline_when=tuple(frozenset(s) for s in ns["FALLBACK_DECLINE_WHEN"]),
            review_ignores=frozenset(ns["FALLBACK_REVIEW_IGNORES"]),
            review_amount=float(ns["FALLBACK_REVIEW_AMOUNT"]),
        )
    except Exception as e:  # a missing name, a wrong shape: say which file
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
    bad = [op for _, _, op, _ in policy.rules if op != "missing" and op not in _COMPARE]
    if bad:
        raise ValueError(f"{path}: unknown comparison(s) {bad}")
    return policy
