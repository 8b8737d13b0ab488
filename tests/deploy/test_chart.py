"""charts/dis rendered by a real helm and checked against Kubernetes' schemas."""

from __future__ import annotations

import base64
import json
import re

import kubernetes_validate
import promql_parser
import pytest
import yaml

from tests.deploy.common import (
    CHART,
    METRICS_TOKEN,
    ROOT,
    SECRETS,
    entrypoint_roles,
    find,
    helm,
    pod_spec,
    reads_env,
    render,
    render_raw,
    with_secrets,
)

#: Everything optional switched on.
EVERYTHING = {
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": [{"host": "dis.example.org", "paths": ["/"]}],
        "tls": [{"secretName": "dis-tls", "hosts": ["dis.example.org"]}],
    },
    "api": {"autoscaling": {"enabled": True}},
    "worker": {"autoscaling": {"enabled": True}, "concurrency": 4},
    "allowedHosts": ["dis.internal"],
    "extraEnv": [{"name": "DIS_DATA_ALLOWED_NETWORKS", "value": "10.0.0.0/8"}],
    "imagePullSecrets": [{"name": "registry"}],
    "nodeSelector": {"pool": "data"},
    "tolerations": [{"key": "data", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"team": "data"},
    "serviceAccount": {"annotations": {"iam": "role"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "prometheusRule": {"enabled": True, "staleAfterSeconds": 3600},
        "grafanaDashboard": {"enabled": True},
        "token": True,
    },
}

#: The oldest and newest Kubernetes the chart supports (Chart.yaml kubeVersion).
K8S_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]

SERVICE_ROLES = ("api", "worker", "beat")


def test_chart_declares_the_kubernetes_versions_it_is_checked_against():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.25.0-0"


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_helm_lint_is_clean(helm_binary, tmp_path, values):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(with_secrets(**values)))
    result = helm("lint", "--strict", str(CHART), "-f", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_passes_the_kubernetes_schema_strictly(
    helm_binary, tmp_path, values, version
):
    docs = render(tmp_path, with_secrets(**values))
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "Deployment", "Deployment", "Job"]
    expected += ["Secret", "Service", "ServiceAccount"]
    if values:
        expected += ["HorizontalPodAutoscaler", "HorizontalPodAutoscaler", "Ingress"]
        expected += ["ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"]
    assert kinds == sorted(expected)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator's CRD: not in Kubernetes' schemas
        # strict: an unknown or misplaced field fails, not only a wrong type.
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_missing_secret_stops_the_render_naming_it(helm_binary, tmp_path):
    values = with_secrets()
    del values["secrets"]["values"]["DATABASE_URL"]
    result = render_raw(tmp_path, values)
    assert result.returncode != 0
    assert "secrets.values.DATABASE_URL is required" in result.stderr


def test_a_secret_put_in_the_config_map_is_refused(helm_binary, tmp_path):
    result = render_raw(tmp_path, with_secrets(config={"REDIS_URL": "redis://x"}))
    assert result.returncode != 0
    assert "config.REDIS_URL is a secret" in result.stderr


def test_secret_values_appear_only_in_the_secret(helm_binary, tmp_path):
    result = render_raw(tmp_path, with_secrets(**EVERYTHING))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    for doc in docs:
        text = yaml.safe_dump(doc)
        for value in [*SECRETS.values(), METRICS_TOKEN]:
            assert value not in text, f"{value} in {doc['kind']}"
    secret = find(docs, "Secret", "rel-dis-secrets")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {**SECRETS, "DIS_METRICS_TOKEN": METRICS_TOKEN}


def test_pods_read_the_secrets_from_the_secret_as_files_and_references(
    helm_binary, tmp_path
):
    docs = render(tmp_path, with_secrets())
    for role in SERVICE_ROLES:
        spec = pod_spec(find(docs, "Deployment", f"rel-dis-{role}"))
        [container] = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name in ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "rel-dis-secrets", "key": name}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == "rel-dis-secrets"
        for name in ("DJANGO_SECRET_KEY", "DIS_ENCRYPTION_KEYS"):
            # config.settings reads NAME_FILE (env_secret); the file is the key.
            assert env[f"{name}_FILE"]["value"] == f"{mounts['secrets']}/{name}"
            assert {"key": name, "path": name} in volumes["secrets"]["secret"]["items"]


def test_an_existing_secret_is_used_and_none_is_created(helm_binary, tmp_path):
    docs = render(tmp_path, {"secrets": {"existingSecret": "ops-dis"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for role in SERVICE_ROLES:
        deployment = find(docs, "Deployment", f"rel-dis-{role}")
        spec = pod_spec(deployment)
        refs = [
            e["valueFrom"]["secretKeyRef"]["name"]
            for c in spec["containers"] + spec["initContainers"]
            for e in c["env"]
            if "valueFrom" in e
        ]
        assert len(refs) == 6
        assert set(refs) == {"ops-dis"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == "ops-dis"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert "checksum/secrets" not in annotations


def test_a_changed_secret_or_config_rolls_the_pods(helm_binary, tmp_path):
    def annotations(values):
        docs = render(tmp_path, values)
        return find(docs, "Deployment", "rel-dis-worker")["spec"]["template"][
            "metadata"
        ]["annotations"]

    before = annotations(with_secrets())
    changed = with_secrets()
    changed["secrets"]["values"]["REDIS_URL"] = "redis://other:6379/0"
    assert annotations(changed)["checksum/secrets"] != before["checksum/secrets"]
    relogged = annotations(with_secrets(config={"LOG_LEVEL": "DEBUG"}))
    assert relogged["checksum/config"] != before["checksum/config"]
    assert relogged["checksum/secrets"] == before["checksum/secrets"]


def test_beat_is_one_pod_replaced_not_rolled(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets(worker={"replicas": 5}, api={"replicas": 3}))
    beat = find(docs, "Deployment", "rel-dis-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert find(docs, "Deployment", "rel-dis-worker")["spec"]["replicas"] == 5
    assert find(docs, "Deployment", "rel-dis-api")["spec"]["replicas"] == 3
    docs = render(tmp_path, with_secrets(beat={"enabled": False}))
    assert not [d for d in docs if d["metadata"]["name"] == "rel-dis-beat"]


def test_every_container_runs_a_role_of_the_entrypoint(helm_binary, tmp_path):
    roles = entrypoint_roles()
    assert {"api", "worker", "beat", "migrate", "wait-for-migrations"} <= roles
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    seen = {}
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(doc)
        for container in spec.get("initContainers", []) + spec["containers"]:
            assert "command" not in container  # the image's ENTRYPOINT runs
            assert container["args"][0] in roles
            seen[doc["metadata"]["name"], container["name"]] = container["args"]
    assert seen[("rel-dis-api", "api")] == ["api"]
    assert seen[("rel-dis-worker", "worker")] == ["worker"]
    assert seen[("rel-dis-beat", "beat")] == ["beat"]
    assert seen[("rel-dis-migrate-1", "migrate")] == ["migrate"]


def test_pods_wait_for_the_migrations_of_this_revision(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets(migrations={"timeoutSeconds": 900}))
    job = find(docs, "Job", "rel-dis-migrate-1")
    assert pod_spec(job)["restartPolicy"] == "Never"
    for role in SERVICE_ROLES:
        [init] = pod_spec(find(docs, "Deployment", f"rel-dis-{role}"))["initContainers"]
        assert init["args"] == ["wait-for-migrations"]
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env["DIS_MIGRATIONS_TIMEOUT"] == "900"
    docs = render(tmp_path, with_secrets(migrations={"enabled": False}))
    assert not [d for d in docs if d["kind"] == "Job"]
    assert pod_spec(find(docs, "Deployment", "rel-dis-api"))["initContainers"]


def test_api_probes_and_service(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets())
    [api] = pod_spec(find(docs, "Deployment", "rel-dis-api"))["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in (api["livenessProbe"], api["readinessProbe"]):
        [host] = probe["httpGet"]["httpHeaders"]
        assert host == {"name": "Host", "value": "localhost"}
    allowed = find(docs, "ConfigMap", "rel-dis-config")["data"]["DJANGO_ALLOWED_HOSTS"]
    assert "localhost" in allowed.split(",")
    service = find(docs, "Service", "rel-dis-api")
    assert (
        service["spec"]["selector"]
        == find(docs, "Deployment", "rel-dis-api")["spec"]["selector"]["matchLabels"]
    )
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_allowed_hosts_name_the_ingress_the_service_and_extra_hosts(
    helm_binary, tmp_path
):
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    config = find(docs, "ConfigMap", "rel-dis-config")["data"]
    assert config["DJANGO_SETTINGS_MODULE"] == "config.settings.production"
    hosts = config["DJANGO_ALLOWED_HOSTS"].split(",")
    for host in ("dis.example.org", "dis.internal", "rel-dis-api"):
        assert host in hosts
    assert "rel-dis-api.ns.svc.cluster.local" in hosts
    ingress = find(docs, "Ingress", "rel-dis")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-dis-api", "port": {"name": "http"}}


def test_autoscalers_target_the_api_and_the_workers(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    for role in ("api", "worker"):
        hpa = find(docs, "HorizontalPodAutoscaler", f"rel-dis-{role}")
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"rel-dis-{role}"
        # The autoscaler owns the count: the Deployment names none.
        assert "replicas" not in find(docs, "Deployment", f"rel-dis-{role}")["spec"]


def test_containers_run_unprivileged_on_a_read_only_root(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets())
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts  # noqa: S108 - the pod's one writable path


def test_every_variable_the_chart_sets_is_one_the_service_reads(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets(config={"DIS_DEFAULT_CHUNK_ROWS": "20000"}))
    names = set(find(docs, "ConfigMap", "rel-dis-config")["data"])
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            spec = pod_spec(doc)
            for container in spec.get("initContainers", []) + spec["containers"]:
                names |= {e["name"] for e in container["env"]}
    assert "DIS_DEFAULT_CHUNK_ROWS" in names
    unread = sorted(n for n in names if not reads_env(n))
    assert unread == []


def test_the_service_monitor_scrapes_the_api_pods_with_the_token(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    monitor = find(docs, "ServiceMonitor", "rel-dis")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = find(docs, "Service", "rel-dis-api")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    credentials = endpoint["authorization"]["credentials"]
    assert credentials == {"name": "rel-dis-secrets", "key": "DIS_METRICS_TOKEN"}
    [api] = pod_spec(find(docs, "Deployment", "rel-dis-api"))["containers"]
    env = {e["name"]: e for e in api["env"]}
    assert env["DIS_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == credentials


def test_no_token_no_monitor_by_default(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets())
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    [api] = pod_spec(find(docs, "Deployment", "rel-dis-api"))["containers"]
    assert "DIS_METRICS_TOKEN" not in {e["name"] for e in api["env"]}
    values = with_secrets(metrics={"token": True})
    del values["secrets"]["values"]["DIS_METRICS_TOKEN"]
    result = render_raw(tmp_path, values)
    assert result.returncode != 0
    assert "DIS_METRICS_TOKEN is required with metrics.token" in result.stderr


def test_the_alerts_are_valid_promql_over_metrics_the_service_exports(
    helm_binary, tmp_path
):
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    rule = find(docs, "PrometheusRule", "rel-dis")
    [group] = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert "DisPipelineStale" in alerts
    assert alerts["DisPipelineStale"]["expr"].endswith("> 3600")
    exported = _exported_metrics()
    for name, rule in alerts.items():
        promql_parser.parse(rule["expr"])  # raises on a syntax error
        used = set(re.findall(r"\bdis_[a-z_]+", rule["expr"]))
        assert used, name
        assert used <= exported, (name, used - exported)
        # Prometheus' own templates survive Helm's: {{ $labels.pipeline }} is kept.
        summary = rule["annotations"]["summary"]
        assert "{{" not in summary or "{{ $labels.pipeline }}" in summary, summary


def test_the_pod_monitor_scrapes_each_workers_own_metrics(helm_binary, tmp_path):
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    monitor = find(docs, "PodMonitor", "rel-dis-worker")
    worker = find(docs, "Deployment", "rel-dis-worker")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector == worker["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    [container] = pod_spec(worker)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert endpoint["port"] == "metrics"
    assert env["DIS_WORKER_METRICS_PORT"] == str(ports["metrics"]) == "9808"


def _exported_metrics() -> set[str]:
    """The series names the API's collector and the workers' metrics produce."""
    names = set()
    for path in ("integration/metrics.py", "config/worker_metrics.py"):
        names |= set(re.findall(r'"(dis_[a-z_]+)"', (ROOT / path).read_text()))
    # prometheus_client's counter and histogram series.
    names.add("dis_worker_tasks_total")
    for suffix in ("bucket", "count", "sum"):
        names.add(f"dis_worker_task_duration_seconds_{suffix}")
    return names


def test_the_grafana_dashboard_queries_only_what_the_service_exports(
    helm_binary, tmp_path
):
    docs = render(tmp_path, with_secrets(**EVERYTHING))
    config_map = find(docs, "ConfigMap", "rel-dis-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["dis.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "dis.json").read_text())
    exported = _exported_metrics()
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(targets) >= 10
    for target in targets:
        expr = target["expr"].replace("$pipeline", ".*")  # Grafana's variable
        promql_parser.parse(expr)
        used = set(re.findall(r"\bdis_[a-z_]+", expr))
        assert used, expr
        assert used <= exported, (expr, used - exported)
    docs = render(tmp_path, with_secrets())
    assert not [d for d in docs if d["metadata"]["name"] == "rel-dis-dashboard"]
