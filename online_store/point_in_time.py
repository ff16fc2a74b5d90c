"""Feast's point-in-time join (``get_historical_features``), made to tell entity rows apart.

Feast 0.67's Spark offline store names each entity row by its join keys and timestamp
concatenated *without a separator*, and keeps one feature row per name: at one instant,
user 48 at merchant 54 and user 485 at merchant 4 are both ``"4854…"``, and both get
whichever of their two rows is newer (found by the skew check: 21 payments served, 11
"offline"). Every entity row of a skew check shares one instant, so this is common there
(elsewhere it takes two such entities at the same microsecond). :func:`historical_features`
(the one way hotpath asks Feast for point-in-time rows) prefixes each key with its length
first, which makes the name unambiguous whatever the keys contain. Once patched, every
Spark point-in-time join of the process uses the fixed template.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from feast import FeatureService, FeatureStore

log = logging.getLogger(__name__)

# Feast's template, one entity's part of the row name; replaced by "<length>:<key>"
_CONCATENATED = "CAST({{entity}} AS STRING),"
_PREFIXED = "CAST(LENGTH(CAST({{entity}} AS STRING)) AS STRING), ':', CAST({{entity}} AS STRING),"


def historical_features(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    features: list[str] | FeatureService,
    full_feature_names: bool = False,
) -> pd.DataFrame:
    """``store.get_historical_features(...).to_df()`` with distinct rows kept distinct."""
    _name_rows_unambiguously()
    return store.get_historical_features(
        entity_df=entity_df, features=features, full_feature_names=full_feature_names
    ).to_df()


def _name_rows_unambiguously() -> None:
    """Patch the Spark offline store's query template once (it is read at each call). A
    Feast whose template lacks the fragment has changed it: left as it is, with a warning
    (the test of colliding keys in ``tests/test_online.py`` says whether it still needs
    this)."""
    from feast.infra.offline_stores.contrib.spark_offline_store import spark

    template: Any = spark.MULTIPLE_FEATURE_VIEW_POINT_IN_TIME_JOIN
    if _PREFIXED in template:
        return
    if template.count(_CONCATENATED) != 1:
        log.warning("Feast's Spark point-in-time template changed: entity rows left unpatched")
        return
    spark.MULTIPLE_FEATURE_VIEW_POINT_IN_TIME_JOIN = template.replace(_CONCATENATED, _PREFIXED)
