"""From a score (or, without one, from rules) to a decision, with reasons.

Each model's policy is its declaration (``feature_repo/models.py``), recorded by training
in the published version's metadata (:meth:`Policy.from_record`) and served from there, so
a version always runs with the policy it was published with. No feature is named here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}
Condition = tuple[str, str, Any]  # (field, comparison, threshold)


def _holds(cond: Condition, values: dict[str, Any]) -> bool:
    field, comparison, threshold = cond
    value = values.get(field)
    if comparison == "missing":
        return value is None
    try:
        return value is not None and _COMPARE[comparison](value, threshold)
    except TypeError:  # a value of another type than the rule's (a foreign writer's): no
        return False


@dataclass(frozen=True)
class FallbackRule:
    decision: str
    reasons: frozenset[str]
    any_reason_except: frozenset[str] | None
    when: Condition | None

    def matches(self, codes: set[str], values: dict[str, Any]) -> bool:
        return (
            self.reasons <= codes
            and (self.any_reason_except is None or bool(codes - self.any_reason_except))
            and (self.when is None or _holds(self.when, values))
        )


@dataclass(frozen=True)
class Policy:
    """Thresholds, reason rules and the fallback rule (``feature_repo/model_declaration.py``
    says what each means)."""

    thresholds: tuple[tuple[float, str], ...]  # highest first
    below: str
    rules: tuple[tuple[str, Condition], ...]
    fallback_rules: tuple[FallbackRule, ...]
    otherwise: str

    @property
    def decisions(self) -> list[str]:
        """Every decision this policy can give."""
        found = [d for _, d in self.thresholds] + [self.below, self.otherwise]
        found += [r.decision for r in self.fallback_rules]
        return list(dict.fromkeys(found))

    @property
    def fields(self) -> set[str]:
        """The feature and request fields the policy reads."""
        conds = [c for _, c in self.rules] + [r.when for r in self.fallback_rules if r.when]
        return {c[0] for c in conds}

    @property
    def reason_fields(self) -> set[str]:
        """The fields the reason rules read (every answer evaluates them)."""
        return {c[0] for _, c in self.rules}

    def decide(self, score: float) -> str:
        for threshold, verdict in self.thresholds:
            if score >= threshold:
                return verdict
        return self.below

    def decide_all(self, scores: np.ndarray) -> list[str]:
        """:meth:`decide` for every score, in a few numpy calls for a large batch (compared
        as float64, as :meth:`decide` compares a Python float; NaN meets no threshold)."""
        x = np.asarray(scores, dtype=np.float64)
        if len(x) <= 32:  # a few numpy calls cost more than a few Python comparisons
            return [self.decide(s) for s in x.tolist()]
        first = np.full(len(x), len(self.thresholds))  # the first threshold met (highest first)
        for k in range(len(self.thresholds) - 1, -1, -1):
            first[x >= self.thresholds[k][0]] = k
        labels = np.array([d for _, d in self.thresholds] + [self.below], dtype=object)
        return labels[first].tolist()  # type: ignore[no-any-return]

    def reasons(self, values: dict[str, Any]) -> list[str]:
        """Reason codes a reviewer understands, from the values behind the decision."""
        return [code for code, cond in self.rules if _holds(cond, values)]

    def fallback(self, values: dict[str, Any]) -> str:
        """The decision without a model (late or down): conservative, explainable;
        ``values`` holds the features and the request's fields."""
        codes = set(self.reasons(values))
        for rule in self.fallback_rules:
            if rule.matches(codes, values):
                return rule.decision
        return self.otherwise

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Policy:
        """The policy as ``metadata.json`` records it (the declaration's fields, as JSON);
        ValueError on an unknown comparison or a malformed record."""

        def cond(c: dict[str, Any] | None) -> Condition | None:
            if c is None:
                return None
            if c["comparison"] != "missing" and c["comparison"] not in _COMPARE:
                raise ValueError(f"unknown comparison {c['comparison']!r}")
            return (str(c["field"]), str(c["comparison"]), c["threshold"])

        try:
            thresholds = sorted(((float(t), str(d)) for t, d in record["thresholds"]), reverse=True)
            rules = tuple((str(r["code"]), cond(r["when"])) for r in record["reasons"])
            fallback = tuple(
                FallbackRule(
                    str(r["decision"]),
                    frozenset(r["reasons"]),
                    None if r["any_reason_except"] is None else frozenset(r["any_reason_except"]),
                    cond(r["when"]),
                )
                for r in record["fallback"]
            )
            return cls(
                tuple(thresholds),
                str(record["below"]),
                rules,  # type: ignore[arg-type]
                fallback,
                str(record["fallback_otherwise"] or record["below"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed decision policy record: {type(e).__name__}: {e}") from None
