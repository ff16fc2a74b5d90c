"""The one owner of the online-store layout and of every call into Feast internals.

Feast's online stores are the contract between hotpath's writers (fast materialization,
the streaming sink), its readers (the serving fast path) and its checks (freshness,
readiness). What they must agree on lives here, once:

* :mod:`online_store.layout`: Feast's Redis layout (entity keys, ``mmh3`` field names, the
  ``_ts:<view>`` event time), value and timestamp codecs, the compare-and-set write and the
  materialization marker;
* :mod:`online_store.tiers`: which store holds a feature view (the tiered store, routed by
  each view's tag, is Feast's custom online store class here);
* :mod:`online_store.connect`: connections from a Feast online-store config (redis-py and
  the raw RESP client of the hot path);
* :mod:`online_store.read`: reading what Feast wrote, per store, for serving and checks.

It imports neither ``serving`` nor ``pipelines``: both use it (``serving`` never imports
``pipelines``). A test keeps Feast's private names and the layout's spellings out of the
other packages.
"""
