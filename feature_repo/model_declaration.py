"""How a model is declared next to its FeatureService (the objects ``models.py`` uses).

Plain frozen dataclasses, no Feast types of their own: ``feast apply`` / ``feast plan``
import this module like every file of the repo and find nothing to register here. hotpath
reads the declarations (``hotpath train --model NAME``), records everything serving needs
in the published version's ``metadata.json`` (request schema, features, defaults, policy),
and the service serves that record: a change here takes effect with the next version.

A condition is ``(field, comparison, threshold)`` over a feature or request field; its
comparison is ``>``, ``>=``, ``<``, ``<=``, ``==`` (false when the value is missing) or
``missing``.
"""

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

BINARY = "binary_classification"  # score: P(label is true)
RANKING = "ranking"  # score: relevance of a candidate within its group (higher first)
COMPARISONS = (">", ">=", "<", "<=", "==", "missing")


@dataclass(frozen=True)
class Labels:
    """Where labelled examples come from: a Feast file/Spark source whose rows carry the
    request's entity keys and request fields, the event time (the source's
    ``timestamp_field``), the label, and when the label became known."""

    source: Any  # a Feast data source with a parquet ``path`` (e.g. a SparkSource)
    label: str  # the label column (bool or 0/1; a relevance grade for ranking)
    known_at: str | None = None  # rows whose label was known after the cut-off are left out
    order_by: tuple[str, ...] = ()  # tie-breakers after the event time, for a stable order
    # features are looked up this long before the event: what a scoring call saw
    lookup_offset: timedelta = timedelta(microseconds=1)
    group_by: tuple[str, ...] = ()  # ranking: the columns one query's candidates share
    # the column holding the id a client sends as ``X-Request-ID`` when it scores the event:
    # ``hotpath train --served`` joins logged predictions to their labels on it
    request_id: str | None = None


@dataclass(frozen=True)
class Training:
    """LightGBM parameters and how the examples are split (by time, latest last)."""

    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 10
    subsample: float = 0.9
    colsample_bytree: float = 0.9
    valid_fraction: float = 0.25
    seed: int = 7
    baseline: str | None = None  # a request field reported as a one-column score to beat


@dataclass(frozen=True)
class Condition:
    field: str
    comparison: str
    threshold: float | None = None


@dataclass(frozen=True)
class Reason:
    """A reason code reported when its condition holds."""

    code: str
    when: Condition


@dataclass(frozen=True)
class FallbackRule:
    """Decides ``decision`` when every given part holds: all of ``reasons`` present; some
    reason other than ``any_reason_except`` present; ``when`` true."""

    decision: str
    reasons: frozenset[str] = frozenset()
    any_reason_except: frozenset[str] | None = None
    when: Condition | None = None


@dataclass(frozen=True)
class CanaryThresholds:
    """When serving rolls a canary of this model back (``hotpath models canary``; None:
    serving's default, see ``serving/canary.py``): the candidate's fallback/error share
    above the stable version's, its p99 latency over the stable's, the PSI of its scores
    against the stable's on the same traffic, each judged over the last ``window`` rows
    once each version has ``min_samples``; ``step_s`` > 0 advances the steps on a
    schedule."""

    max_fallback_excess: float | None = None
    max_p99_ratio: float | None = None
    p99_slack_ms: float | None = None
    max_psi: float | None = None
    window: int | None = None
    min_samples: int | None = None
    step_s: float | None = None


@dataclass(frozen=True)
class DecisionPolicy:
    """Score -> decision (the first threshold the score reaches, highest first; ``below``
    under all), reason codes, and the rule-based decision used without a score (the first
    fallback rule that matches, else ``fallback_otherwise``)."""

    thresholds: tuple[tuple[float, str], ...]
    below: str
    reasons: tuple[Reason, ...] = ()
    fallback: tuple[FallbackRule, ...] = ()
    fallback_otherwise: str = ""
    # recorded with the policy in metadata.json, so a published version carries them
    canary: CanaryThresholds = field(default_factory=CanaryThresholds)


@dataclass(frozen=True)
class Model:
    name: str
    feature_service: Any  # the feast.FeatureService it is trained and served on
    labels: Labels
    policy: DecisionPolicy
    task: str = BINARY
    training: Training = field(default_factory=Training)
    # inclusive (min, max) of request fields and entity keys; others are only typed
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    batch_field: str = "rows"  # the list's name in a batch request body
    default: bool = False  # also served on the unversioned /predict and /predict/batch
    # a join key a request may give as a list of candidates (POST /v1/models/NAME/rank:
    # scored together, answered ranked by score, ``top_k`` of them)
    candidate_key: str | None = None
    max_candidates: int = 100
    # share of requests whose served vectors are logged (serving.served_log); 1.0: every one
    log_sample_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.log_sample_rate <= 1.0:
            raise ValueError(f"model {self.name}: log_sample_rate must be in [0, 1]")
