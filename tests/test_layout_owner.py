"""One owner of the online-store layout: no module in ``serving/``, ``pipelines/`` or
``validation/`` calls Feast's private APIs, imports its online-store internals, spells
Feast's Redis layout or resolves tiers itself; they all go through ``online_store/``.

The check reads the sources' syntax trees (names, attributes, imports and string literals;
docstrings and comments may describe the layout), and its own test plants each kind of
use in a scratch file to prove it catches them.
"""

from __future__ import annotations

import ast

from conftest import ROOT

SCANNED = ("serving", "pipelines", "validation")

# Feast's private helpers and internal entry points, and the tier resolution the owner does
NAMES = {
    "_mmh3": "Feast's Redis field hash",
    "_redis_key": "Feast's Redis key",
    "serialize_entity_key": "Feast's entity-key encoding",
    "serialize_entity_key_prefix": "Feast's entity-key encoding",
    "deserialize_entity_key": "Feast's entity-key encoding",
    "_get_provider": "Feast's provider (private)",
    "_get_client": "Feast's Redis client (private)",
    "_get_client_async": "Feast's Redis client (private)",
    "_parse_connection_string": "Feast's connection-string parser (private)",
    "_online_store": "Feast's repo-config internals",
    "get_online_config_from_type": "building a tier's config (tier resolution)",
    "get_online_store_from_config": "building a tier's store (tier resolution)",
    "routing_tag": "tier resolution",
}
MODULES = {
    "feast.infra.online_stores": "Feast's online-store internals",
    "feast.infra.key_encoding_utils": "Feast's entity-key encoding",
    "google.protobuf.timestamp_pb2": "the layout's event-time codec",
}
STRINGS = {
    "_ts:": "Feast's event-time field",
    "hotpath:materialized": "the materialization marker",
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def violations(source: str, name: str) -> list[str]:
    """Each use in ``source`` of what only ``online_store/`` may use, as ``file:line why``."""
    tree = ast.parse(source, name)
    docs = _docstrings(tree)
    found = []

    def flag(node: ast.AST, what: str, why: str) -> None:
        found.append(f"{name}:{node.lineno} {what}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in NAMES:
            flag(node, node.id, NAMES[node.id])
        elif isinstance(node, ast.Attribute) and node.attr in NAMES:
            flag(node, node.attr, NAMES[node.attr])
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules.append(node.module)
                modules += [f"{node.module}.{a.name}" for a in node.names]
            hits = [
                (module, why)
                for module in modules
                for banned, why in MODULES.items()
                if module == banned or module.startswith(banned + ".")
            ]
            if hits:
                flag(node, *hits[0])
            for alias in node.names:
                if alias.name in NAMES:
                    flag(node, alias.name, NAMES[alias.name])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            if id(node) in docs:
                continue
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            for spelled, why in STRINGS.items():
                if spelled in text:
                    flag(node, repr(spelled), why)
    return found


def test_only_the_owner_touches_feast_internals_and_the_layout() -> None:
    found = []
    files = [p for pkg in SCANNED for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20  # the packages are where this test thinks they are
    for path in files:
        found += violations(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "use online_store/ instead:\n" + "\n".join(found)


def test_the_check_catches_each_kind_of_use() -> None:
    planted = {
        "from feast.infra.online_stores.helpers import _mmh3": "_mmh3",
        "from feast.infra.online_stores import helpers": "feast.infra.online_stores",
        "from feast.infra import key_encoding_utils": "feast.infra.key_encoding_utils",
        "import feast.infra.key_encoding_utils as k": "feast.infra.key_encoding_utils",
        "client = RedisOnlineStore()._get_client(cfg)": "_get_client",
        "provider = store._get_provider()": "_get_provider",
        "n, p = RedisOnlineStore._parse_connection_string(s)": "_parse_connection_string",
        "key = serialize_entity_key(proto, 3)": "serialize_entity_key",
        "tier = view.tags.get(cfg.routing_tag)": "routing_tag",
        'field = f"_ts:{view}".encode()': "'_ts:'",
        'field = b"_ts:" + name': "'_ts:'",
        'key = "hotpath:materialized:" + project': "'hotpath:materialized'",
    }
    for line, what in planted.items():
        found = violations(f'"""Docs may say _ts:<view> and _mmh3."""\n\n{line}\n', "planted.py")
        assert any(what in f for f in found), (line, found)
    clean = '"""The ``_ts:<view>`` field, Feast\'s ``_mmh3``."""\n\nx = "ts"  # _ts: in a comment\n'
    assert violations(clean, "clean.py") == []
