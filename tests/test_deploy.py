"""deploy/ checked without a cluster, Docker or Prometheus: every Kubernetes manifest against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), the
operators' custom resources for their shape only (no schema here), the wiring between
objects (selectors, the stream's process addressing, probes, Triton, Spark), every
``HOTPATH_*`` variable and ``hotpath`` option against the settings tree and the CLI, the
compose file's services and loopback bindings, and every metric and label a Prometheus rule
or a Grafana panel uses against the metric families the code registers."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
RULES = DEPLOY / "prometheus" / "rules" / "hotpath.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hotpath.json"
NAMESPACE = "hotpath"
# The oldest Kubernetes the manifests claim (CronJob timeZone, policy/v1, autoscaling/v2 are
# GA well before it) and the newest kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
# Operators' kinds: their CRDs are not installed here, so only their shape is checked.
CUSTOM_RESOURCES = {
    ("redis.redis.opstreelabs.in/v1beta2", "RedisCluster"),
    ("scylla.scylladb.com/v1", "ScyllaCluster"),
    ("kafka.strimzi.io/v1beta2", "Kafka"),
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
}
SECRET_NAME = re.compile(r"PASSWORD|API_KEY|METRICS_KEY|SECRET|TOKEN")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


# --- loading -----------------------------------------------------------------------------


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    """Every object in deploy/k8s (kustomization files are kustomize's, not objects)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def pod_specs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod template metadata, pod spec) of every workload."""
    for _, d in manifests():
        spec = d.get("spec", {})
        if d["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if d["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job"):
            yield d["metadata"]["name"], spec["template"]["metadata"], spec["template"]["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def container(workload: str, name: str) -> dict[str, Any]:
    for w, _, pod in pod_specs():
        for c in containers(pod):
            if w == workload and c["name"] == name:
                return c
    raise AssertionError(f"no container {name} in {workload}")


def script(c: dict[str, Any]) -> str:
    """A container's command line, or its ``sh -c`` script."""
    argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
    return argv[2] if argv[:2] == ["sh", "-c"] else shlex.join(argv)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A k8s container's environment: name -> its entry (ConfigMaps' keys as ``value``)."""
    maps = objects("ConfigMap")
    env: dict[str, dict[str, Any]] = {}
    for src in c.get("envFrom", []):
        for k, v in maps[src["configMapRef"]["name"]]["data"].items():
            env[k] = {"name": k, "value": v}
    for e in c.get("env", []):
        env[e["name"]] = e
    return env


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# --- Kubernetes --------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    """Every built-in object validates, strictly, against the OpenAPI schemas of the pinned
    Kubernetes; a kind without a schema must be one of the listed custom resources."""
    errors, checked = [], 0
    for path, doc in manifests():
        where = f"{path.relative_to(DEPLOY)}: {doc.get('kind')}/{doc['metadata'].get('name')}"
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{where}: {e.message} (not a listed custom resource)")
    assert not errors, "\n".join(errors)
    assert checked >= 15


def test_custom_resources_are_listed_and_well_formed() -> None:
    """The operators' objects are exactly the listed ones, have no schema here (so the list
    is honest), and carry apiVersion, kind, a valid name, the namespace and a spec."""
    found = set()
    for path, doc in manifests():
        key = (doc["apiVersion"], doc["kind"])
        try:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert key in CUSTOM_RESOURCES, f"{path.name}: {key} has no schema"
        else:
            assert key not in CUSTOM_RESOURCES, f"{key} has a schema: validate it"
            continue
        found.add(key)
        meta = doc["metadata"]
        assert DNS_1123.fullmatch(meta["name"]) and len(meta["name"]) <= 253, meta["name"]
        assert meta["namespace"] == NAMESPACE
        assert isinstance(doc.get("spec"), dict) and doc["spec"], f"{meta['name']}: no spec"
    assert found == CUSTOM_RESOURCES


def test_kustomizations_list_every_manifest() -> None:
    for kust in sorted(K8S.rglob("kustomization.yaml")):
        k = yaml.safe_load(kust.read_text())
        files = sorted(p.name for p in kust.parent.glob("*.yaml") if p != kust)
        assert sorted(k["resources"]) == files, kust
        assert k["namespace"] == NAMESPACE


def test_namespace_labels_and_resources() -> None:
    """Every object is in the namespace with the common labels; every container (init
    containers too) requests and limits CPU and memory; selectors match pod labels."""
    for path, doc in manifests():
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{path.name}: {meta['name']}"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "hotpath", meta["name"]
        assert "app.kubernetes.io/name" in labels, meta["name"]
    pod_labels = {}
    for workload, tmeta, pod in pod_specs():
        pod_labels[workload] = tmeta["labels"]
        assert tmeta["labels"].get("app.kubernetes.io/part-of") == "hotpath"
        for c in containers(pod):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{workload}/{c['name']}"
    for kind in ("Deployment", "StatefulSet"):
        for name, d in objects(kind).items():
            selector = d["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod_labels[name].items(), name
    for name, svc in objects("Service").items():
        sel = svc["spec"]["selector"].items()
        assert any(sel <= labels.items() for labels in pod_labels.values()), f"Service {name}"


def test_no_secret_values_in_manifests() -> None:
    """Secrets come from the Secret the README says how to create; none is written here."""
    assert not objects("Secret")
    readme = (DEPLOY / "README.md").read_text()
    for workload, _, pod in pod_specs():
        for c in containers(pod):
            for name, e in env_of(c).items():
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if SECRET_NAME.search(name):
                    assert ref, f"{workload}/{c['name']}: {name} must come from a Secret"
                if ref:
                    assert ref["name"] == "hotpath-secrets"
                    assert f"--from-literal={ref['key']}=" in readme, ref["key"]


def test_serve_probes_and_autoscaling() -> None:
    d = objects("Deployment")["hotpath-serve"]
    c = container("hotpath-serve", "serve")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ports
    env = env_of(c)
    assert int(env["HOTPATH_SERVING_PORT"]["value"]) == ports["http"]
    hpa = objects("HorizontalPodAutoscaler")["hotpath-serve"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "hotpath-serve",
    }
    assert 2 <= hpa["minReplicas"] == d["spec"]["replicas"] < hpa["maxReplicas"]
    pdb = objects("PodDisruptionBudget")["hotpath-serve"]["spec"]
    assert pdb["minAvailable"] < hpa["minReplicas"]


def test_stream_statefulset_addressing_and_recovery() -> None:
    """``-i`` is the pod ordinal and ``-a`` lists every pod through the headless Service on
    the declared port; replicas, STREAM_PROCESSES and the recovery partitions agree; the
    recovery folder is the per-pod volume."""
    sts = objects("StatefulSet")["hotpath-stream"]
    spec = sts["spec"]
    svc = objects("Service")[spec["serviceName"]]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    assert spec["podManagementPolicy"] == "Parallel"
    main, init = (
        container("hotpath-stream", "stream"),
        container("hotpath-stream", "recovery-partition"),
    )
    for c in (main, init):
        assert int(env_of(c)["STREAM_PROCESSES"]["value"]) == spec["replicas"]
    run = script(main)
    assert '--process-id "$ordinal"' in run and 'ordinal="${HOSTNAME##*-}"' in run
    port = {p["name"]: p["containerPort"] for p in main["ports"]}["bytewax"]
    name = sts["metadata"]["name"]
    assert '--addresses "$addresses"' in run
    assert f"{name}-$i.{spec['serviceName']}.$POD_NAMESPACE.svc:{port}" in run
    assert svc["ports"][0]["targetPort"] == "bytewax"
    recovery = re.search(r"--recovery-dir (\S+)", run)[1]
    claim = {v["metadata"]["name"] for v in spec["volumeClaimTemplates"]}
    for c in (main, init):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert mounts.get(recovery) in claim, c["name"]
    assert f'cp "/tmp/parts/part-${{ordinal}}.sqlite3" {recovery}/' in script(init)
    # the metrics sidecar forwards to the port the flow serves on loopback
    sidecar = container("hotpath-stream", "metrics")
    flow_port = env_of(main)["HOTPATH_STREAM_METRICS_PORT"]["value"]
    assert f"TCP:127.0.0.1:{flow_port}" in sidecar["args"]


def test_triton_on_gpu_nodes() -> None:
    d = objects("Deployment")["hotpath-triton"]["spec"]["template"]["spec"]
    c = container("hotpath-triton", "triton")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert d["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in d["tolerations"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    args = " ".join(c["command"])
    for name, port in ports.items():
        assert f"--{name}-port={port}" in args
    repo = re.search(r"--model-repository=(\S+)", args)[1]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repo)
    assert mount["subPath"] == "model_repository" and mount["readOnly"]
    svc = objects("Service")["hotpath-triton"]["spec"]["ports"]
    grpc = next(p["port"] for p in svc if p["targetPort"] == "grpc")
    url = env_of(container("hotpath-serve", "serve"))["HOTPATH_SERVING_TRITON_URL"]["value"]
    assert url == f"hotpath-triton:{grpc}"


def test_spark_backfill_cronjob() -> None:
    """spark-submit of the batch job with options its parser declares, against the master
    URL the ConfigMap gives and the master Service serves."""
    c = container("hotpath-backfill", "backfill")
    run = script(c).replace("\\\n", " ")
    submit = next(line for line in run.splitlines() if line.lstrip().startswith("spark-submit"))
    assert '--master "$HOTPATH_SPARK_MASTER"' in submit
    job = re.search(r"(pipelines/\S+\.py)(.*)", submit, re.S)
    assert (ROOT / job[1]).is_file()
    declared = set(re.findall(r'add_argument\("(--[\w-]+)"', (ROOT / job[1]).read_text()))
    assert set(re.findall(r"(--[\w-]+)", job[2])) <= declared
    master = env_of(c)["HOTPATH_SPARK_MASTER"]["value"]
    host, port = re.fullmatch(r"spark://([\w-]+):(\d+)", master).groups()
    svc = objects("Service")[host]["spec"]["ports"]
    assert int(port) in {p["port"] for p in svc}
    for w in ("hotpath-spark-master", "hotpath-spark-worker"):
        assert objects("Deployment")[w]


# --- hotpath commands and settings, in the manifests and the compose file -----------------


def _hotpath_cli() -> Any:
    """The CLI as its command tree (typer's own click: groups have ``commands``)."""
    from pipelines.cli import app

    return typer.main.get_command(app)


def _opts(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def hotpath_invocations(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """(command path, options) of each ``hotpath ...`` in a command line or script."""
    lex = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    tokens = list(lex)
    for i, tok in enumerate(tokens):
        if tok != "hotpath":
            continue
        words: list[str] = []
        for t in tokens[i + 1 :]:
            if t and set(t) <= set(";&|"):
                break
            words.append(t)
        path = [w for w in words if re.fullmatch(r"[a-z][a-z-]*", w)][:2]
        yield path, [w.split("=")[0] for w in words if w.startswith("-")]


def all_commands() -> list[tuple[str, str]]:
    """(where, command text) of every container in the manifests and the compose file."""
    out = [(f"{w}/{c['name']}", script(c)) for w, _, pod in pod_specs() for c in containers(pod)]
    for name, svc in compose()["services"].items():
        cmd = svc.get("command")
        if cmd:
            out.append((f"compose {name}", cmd[2] if cmd[:2] == ["sh", "-c"] else shlex.join(cmd)))
    return out


def test_hotpath_commands_use_real_options() -> None:
    """Every ``hotpath`` command a container runs exists, with the options it is given."""
    root, seen = _hotpath_cli(), 0
    for where, text in all_commands():
        for path, options in hotpath_invocations(text):
            cmd, allowed = root, _opts(root)
            for word in path:
                if word in getattr(cmd, "commands", {}):
                    cmd = cmd.commands[word]
                    allowed |= _opts(cmd)
            assert cmd is not root, f"{where}: no hotpath command in {path}"
            assert set(options) <= allowed, f"{where}: {set(options) - allowed} ({cmd.name})"
            seen += 1
    assert seen >= 8


def known_env() -> set[str]:
    """Every variable hotpath reads: the settings tree's fields (each section with its own
    prefix), the CLI's envvars, and the ${HOTPATH_*} the profiles' YAML substitute."""
    from pydantic_settings import BaseSettings

    from pipelines.settings import Settings

    names = set()
    root_prefix = Settings.model_config["env_prefix"]
    for field, info in Settings.model_fields.items():
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseSettings):
            prefix = section.model_config["env_prefix"]
            names |= {(prefix + f).upper() for f in section.model_fields}
        else:
            names.add((root_prefix + field).upper())

    def walk(cmd: Any) -> None:
        for p in cmd.params:
            envvar = getattr(p, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(_hotpath_cli())
    for y in (ROOT / "feature_repo").glob("feature_store*.yaml"):
        names |= set(re.findall(r"\$\{(HOTPATH_\w+)\}", y.read_text()))
    return names


def container_envs() -> Iterator[tuple[str, dict[str, str | None], set[str]]]:
    """(where, HOTPATH_* name -> value (None: unset), names whose value is a secret) for
    every container of the manifests and the compose file that sets any."""
    for w, _, pod in pod_specs():
        for c in containers(pod):
            env, secret = {}, set()
            for name, e in env_of(c).items():
                if "value" in e:
                    env[name] = str(e["value"])
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    env[name], _ = "placeholder", secret.add(name)
            yield f"{w}/{c['name']}", env, secret
    for name, svc in compose()["services"].items():
        env = {k: (None if v is None else str(v)) for k, v in svc.get("environment", {}).items()}
        yield f"compose {name}", env, {k for k, v in env.items() if v is None or "${" in v}


def test_environment_is_settings_hotpath_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every HOTPATH_* variable set anywhere is one hotpath reads, the settings tree loads
    from each container's environment (types, lists as JSON), and secrets are never
    literal values."""
    from pipelines.settings import load_settings

    known, loaded = known_env(), 0
    for where, env, secret in container_envs():
        ours = {k: v for k, v in env.items() if k.startswith("HOTPATH_")}
        if not ours:
            continue
        assert set(ours) <= known, f"{where}: unknown {sorted(set(ours) - known)}"
        for k in ours:
            if SECRET_NAME.search(k):
                assert k in secret, f"{where}: {k} is a literal value"
        with monkeypatch.context() as m:
            for k in list(os.environ):
                if k.startswith("HOTPATH_"):
                    m.delenv(k)
            for k, v in ours.items():
                if v is not None and "${" not in v:
                    m.setenv(k, v)
            s = load_settings()
            if "HOTPATH_STREAM_SOURCE" in ours:
                assert s.stream.source == ours["HOTPATH_STREAM_SOURCE"]
            if "HOTPATH_SERVING_BACKEND" in ours:
                assert s.serving.backend == ours["HOTPATH_SERVING_BACKEND"]
            loaded += 1
    assert loaded >= 6


# --- docker-compose ----------------------------------------------------------------------


def test_compose_services_and_loopback_ports() -> None:
    doc = compose()
    services = doc["services"]
    expected = {"redis", "stream", "serve", "triton", "prometheus", "grafana"}
    assert expected <= set(services)
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} not on loopback"
            published += 1
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.removeprefix("service:") in services
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
            else:
                assert src in doc["volumes"], f"{name}: volume {src}"
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
    assert published >= 6
    assert "${GRAFANA_ADMIN_PASSWORD:?" in COMPOSE.read_text()  # required, never a default


# --- Prometheus and Grafana --------------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, from the metric families the code registers: the
    serving registry (serving.metrics.Metrics) and the stream's module-level metrics."""
    import pipelines.stream.metrics as stream_metrics
    from serving.metrics import Metrics

    registry: CollectorRegistry = Metrics(folder=None).registry
    # the registered collectors: prometheus_client's public collect() names no labels for a
    # labelled metric that has no child yet, so read the collectors themselves
    collectors = list(registry._collector_to_names)
    stream = (MetricWrapperBase, stream_metrics.BatchHistogram)
    collectors += [m for m in vars(stream_metrics).values() if isinstance(m, stream)]
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for c in collectors:
        labels = set(getattr(c, "_labelnames", ()))  # a BatchHistogram has none
        for family in c.collect():
            for suffix in suffixes[family.type]:
                out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    out["up"] = set()  # Prometheus's own, per target
    return out


TARGET_LABELS = {"job", "instance", "pod", "namespace"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}  # fmt: skip
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses (strings, ranges and Grafana's
    ``$variables`` aside)."""
    e = re.sub(r'"(\\.|[^"\\])*"|\'(\\.|[^\'\\])*\'', '""', expr)
    labels = set()
    for block in re.findall(r"\{([^}]*)\}", e):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", e)
    for block in GROUPING.findall(e):
        labels |= {x.strip() for x in block.split(",") if x.strip()}
    e = GROUPING.sub(" ", e)
    e = re.sub(r"\$\w+", " ", e)
    names = set()
    for m in re.finditer(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?|[A-Za-z_:][\w:]*", e):
        word = m.group()
        if word[0].isdigit() or word in PROMQL_WORDS:
            continue
        if re.match(r"\s*\(", e[m.end() :]):
            continue  # a function
        names.add(word)
    return names, labels


def check_expr(where: str, expr: str, exported: dict[str, set[str]]) -> set[str]:
    names, labels = promql_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - set(exported)
    assert not unknown, f"{where}: {sorted(unknown)} not exported by the code"
    allowed = set().union(*(exported[n] for n in names)) | TARGET_LABELS
    assert labels <= allowed, f"{where}: labels {sorted(labels - allowed)} not on {sorted(names)}"
    return names


def test_alert_rules_are_valid_prometheus_rule_files() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert set(doc) == {"groups"}
    group_names, alert_names = set(), []
    for g in doc["groups"]:
        assert set(g) <= {"name", "interval", "limit", "rules"} and g["rules"], g.get("name")
        assert g["name"] not in group_names
        group_names.add(g["name"])
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"])
            assert isinstance(r["expr"], str) and r["expr"].strip()
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", r["for"]), r["alert"]
            assert r["labels"]["severity"] in {"page", "warning"}
            assert r["annotations"]["summary"]
            assert all(isinstance(v, str) for v in {**r["labels"], **r["annotations"]}.values())
            alert_names.append(r["alert"])
    assert len(alert_names) == len(set(alert_names))
    for must in ("P99OverBudget", "FallbackRate", "BreakerOpen", "NotReady", "StreamWriteLag",
                 "StreamDeadLetters", "FeaturesStale"):  # fmt: skip
        assert any(must in a for a in alert_names), must


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = exported_metrics()
    used = set()
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            used |= check_expr(r["alert"], r["expr"], exported)
    dash = json.loads(DASHBOARD.read_text())
    targets = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 15
    for title, expr in targets:
        used |= check_expr(f"panel {title!r}", expr, exported)
    stream = {n for n in used if n.startswith("hotpath_stream_")}
    assert stream and used - stream - {"up"}, "service and stream metrics both shown"


def test_scrape_configs_reach_the_metrics() -> None:
    """Compose: the static targets are compose services on the ports they serve metrics on.
    Kubernetes: each scraped pod's annotated port is one of its containers' ports (the
    keepequal rule keeps exactly that one), and the rule files' glob covers the rules."""
    services = compose()["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("."))
    rules_dir = next(dst for src, dst in mounts.items() if src == "./prometheus/rules")
    assert prom["rule_files"] == [f"{rules_dir}/*.yml"]
    assert RULES.suffix == ".yml"
    jobs = {j["job_name"]: j["static_configs"][0]["targets"][0] for j in prom["scrape_configs"]}
    serve_port = services["serve"]["environment"]["HOTPATH_SERVING_PORT"]
    assert jobs["hotpath-serve"] == f"serve:{serve_port}"
    listen = re.search(r"TCP-LISTEN:(\d+)", services["stream-metrics"]["command"][0])[1]
    assert jobs["hotpath-stream"] == f"stream:{listen}"
    assert jobs["hotpath-triton"] == "triton:8002"
    k8s = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    assert any(r.get("action") == "keepequal" for r in k8s["scrape_configs"][0]["relabel_configs"])
    scraped = 0
    for w, tmeta, pod in pod_specs():
        ann = tmeta.get("annotations", {})
        if ann.get("prometheus.io/scrape") == "true":
            ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
            assert int(ann["prometheus.io/port"]) in ports, w
            assert tmeta["labels"]["app.kubernetes.io/name"] in jobs, w  # same job names
            scraped += 1
    assert scraped == 3


def test_grafana_provisioning() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == uid, p["title"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/hotpath.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    vols = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in vols
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
