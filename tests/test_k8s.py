"""deploy/k8s: the manifests parse, ask for a GPU, probe the service's real health routes (also
checked live against the served Bento in test_deploy.py), configure it only through real settings,
and agree on ports. No cluster here: these are the checks that need none."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"  # the manifests; deploy/k8s/kustomization.yaml includes them, overlays build on them


def documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(BASE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return documents()


def container(k8s) -> dict:
    [only] = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def test_manifests_parse_and_kustomization_lists_them_all(k8s):
    assert set(k8s) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in BASE.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
    assert yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"] == ["base"]
    assert [p.name for p in K8S.glob("*.yaml")] == ["kustomization.yaml"]  # a manifest there would not be applied


@pytest.mark.parametrize("overlay", sorted(p.parent.name for p in K8S.glob("*/kustomization.yaml")
                                           if p.parent != BASE))
def test_overlays_build_on_base_not_on_the_folder_that_holds_them(overlay):
    """kustomize refuses an overlay whose base folder contains it (cycle detected): `..` from
    deploy/k8s/cpu did not build; every overlay names ../base."""
    assert yaml.safe_load((K8S / overlay / "kustomization.yaml").read_text())["resources"][0] == "../base"


def test_one_gpu_per_pod_requested_and_limited(k8s):
    resources = container(k8s)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" in resources["requests"]  # the HPA's utilization is relative to it
    assert container(k8s)["image"].split(":")[0].endswith("glowing-gpu")
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["name"] == "glowing-gpu"


def test_probes_use_the_health_routes_on_the_http_port(k8s):
    c = container(k8s)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 200 only once both models are warm
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    names = {p["name"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in names


def _environment(k8s) -> dict[str, str]:
    env = dict(k8s["ConfigMap"]["data"])
    for ref in container(k8s).get("envFrom", []):
        assert ref["configMapRef"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    for item in container(k8s).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:  # a secret's value is the operator's: any string will do
            assert item["valueFrom"]["secretKeyRef"]["optional"] is True  # the API runs open without it
            env[item["name"]] = "a-secret-from-the-cluster"
        else:  # a resourceFieldRef: the value Kubernetes computes from the request (divisor 1)
            field = item["valueFrom"]["resourceFieldRef"]
            env[item["name"]] = str(container(k8s)["resources"]["requests"][field["resource"].split(".")[1]])
    return env


def test_every_environment_variable_is_a_real_setting_with_a_valid_value(k8s, monkeypatch):
    env = _environment(k8s)
    assert env
    for name in env:
        assert name.startswith("GLOWING_") and name.removeprefix("GLOWING_").lower() in Settings.model_fields, name
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # from the environment, as the service reads it
    for name, value in env.items():
        got = getattr(settings, name.removeprefix("GLOWING_").lower())
        got = got.get_secret_value() if hasattr(got, "get_secret_value") else got
        assert str(got) in (value, f"{float(value)}"
                                                                                if value.isdigit() else value)


def test_service_links_cannot_inject_glowing_variables(k8s):
    """A Service named glowing makes Kubernetes inject GLOWING_SERVICE_HOST, GLOWING_PORT...: names
    in the settings' namespace, so the pod turns that injection off."""
    assert k8s["Service"]["metadata"]["name"].upper().startswith("GLOWING")
    assert k8s["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_ports_agree_between_service_deployment_and_image(k8s):
    c = container(k8s)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000}  # BentoML's port in the generated Dockerfile (EXPOSE 3000)
    [svc_port] = k8s["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] in ports
    pod = k8s["Deployment"]["spec"]["template"]
    assert k8s["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert k8s["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["http"]


def test_autoscaler_targets_the_deployment_and_rollouts_keep_capacity(k8s):
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == k8s["Deployment"]["metadata"]["name"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    rolling = k8s["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_operations_guide_lists_every_setting_with_its_default():
    from deploy import settings_doc
    from service.settings import env_table

    assert settings_doc.main(["--check"]) == 0, "run `python -m deploy.settings_doc`"
    text = settings_doc.DOC.read_text()
    for name, default, _ in env_table():
        assert f"| `{name}` | `{default}` |" in text
    stale = text.replace("| `GLOWING_TIMEOUT` | `120.0` |", "| `GLOWING_TIMEOUT` | `60` |")
    assert settings_doc.render(stale) == text  # what the check compares against: the table regenerated


def _apply(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 replace/remove/add, what kustomize does with these patches; a missing path raises."""
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "remove":
            del node[key]
        elif op["op"] == "replace":
            node[key]  # noqa: B018  (replace needs the target to exist)
            node[key] = op["value"]
        else:
            assert op["op"] == "add", op
            if isinstance(node, list):  # into an array, add inserts before the index ("-": at the end)
                node.insert(len(node) if last == "-" else key, op["value"])
            else:
                node[key] = op["value"]
    return doc


def _overlay(k8s: dict[str, dict], name: str) -> dict[str, dict]:
    """The base documents with the overlay's patches applied, as kustomize would, plus its own resources."""
    overlay = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
    assert overlay["resources"][0] == "../base"
    patched = dict(k8s)
    for extra in overlay["resources"][1:]:
        doc = yaml.safe_load((K8S / name / extra).read_text())
        assert doc["kind"] not in patched, extra
        patched[doc["kind"]] = doc
    for patch in overlay["patches"]:
        kind, target = patch["target"]["kind"], patch["target"]["name"]
        assert patched[kind]["metadata"]["name"] == target
        patched[kind] = _apply(patched[kind], yaml.safe_load(patch["patch"]))
    return patched


def test_cpu_overlay_serves_the_cpu_image_without_a_gpu(k8s, monkeypatch):
    assert yaml.safe_load((K8S / "cpu" / "kustomization.yaml").read_text())["resources"] == ["../base"]
    patched = _overlay(k8s, "cpu")
    c = container(patched)
    assert c["image"].split(":")[0] == yaml.safe_load((ROOT / "bentofile.cpu.yaml").read_text())["name"]
    assert "nvidia.com/gpu" not in c["resources"]["requests"] and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert "tolerations" not in patched["Deployment"]["spec"]["template"]["spec"]
    env = _environment(patched)
    assert env["GLOWING_DEVICE"] == "cpu"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().device == "cpu"


# The serving engine's gauge of generator rows waiting for admission into its running batch, on the
# API's /metrics (docs/OPERATIONS.md, 6), and the queue-time histogram, the alternative signal.
WAITING = "glowing_num_requests_waiting"
QUEUE_TIME = "glowing_request_queue_time_seconds"


def test_queue_hpa_overlay_scales_on_waiting_rows_per_pod_and_keeps_cpu(k8s):
    patched = _overlay(k8s, "queue-hpa")
    hpa = patched["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == k8s["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    first, second = hpa["metrics"]
    assert first["type"] == "Pods" and first["pods"]["metric"]["name"] == WAITING
    assert first["pods"]["target"]["type"] == "AverageValue"
    assert float(first["pods"]["target"]["averageValue"]) > 0
    assert second == k8s["HorizontalPodAutoscaler"]["spec"]["metrics"][0]  # CPU: /score load stays seen
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300  # a queue empties in bursts
    assert patched["Deployment"] == k8s["Deployment"]  # only the autoscaler and the scrape change


def test_queue_hpa_adapter_rules_expose_the_metrics_per_pod():
    values = yaml.safe_load((K8S / "queue-hpa" / "prometheus-adapter-values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    assert set(rules) == {WAITING, f"{QUEUE_TIME}_mean"}
    for name, rule in rules.items():
        assert rule["seriesQuery"].startswith(rule["name"]["matches"].strip("^$") + "{")
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    # a gauge written by several processes of one pod: summed per pod
    assert rules[WAITING]["metricsQuery"] == "sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"
    mean = rules[f"{QUEUE_TIME}_mean"]["metricsQuery"]
    assert f"rate({QUEUE_TIME}_sum{{" in mean and f"rate({QUEUE_TIME}_count{{" in mean and " / " in mean


def test_queue_hpa_scrape_sends_the_api_key_to_metrics(k8s):
    """/metrics answers 401 without the key when GLOWING_API_KEY is set: both scrape configurations send
    the Deployment's Secret as a bearer token, from the pods' named http port."""
    [ref] = [item["valueFrom"]["secretKeyRef"] for item in container(k8s)["env"] if item["name"] == "GLOWING_API_KEY"]
    monitor = _overlay(k8s, "queue-hpa")["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= k8s["Service"]["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in k8s["Service"]["spec"]["ports"]}
    assert endpoint["path"] == k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    auth = endpoint["authorization"]
    assert auth["type"] == "Bearer"
    assert auth["credentials"] == {"name": ref["name"], "key": ref["key"]}  # no `optional`: the Operator ignores it
    [job] = yaml.safe_load((K8S / "queue-hpa" / "prometheus-scrape-config.yaml").read_text())
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].endswith(f"/{ref['name']}/{ref['key']}")
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    app = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keep == {("__meta_kubernetes_pod_label_app_kubernetes_io_name",): app,
                    ("__meta_kubernetes_pod_container_port_name",): "http"}
    assert "http" in {p["name"] for p in container(k8s)["ports"]}
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets  # what the adapter's rules map to Kubernetes objects


def _kustomize() -> list[str] | None:
    """A kustomize to build with: $KUSTOMIZE (a kustomize or kubectl binary), else either on PATH."""
    found = os.environ.get("KUSTOMIZE") or shutil.which("kustomize") or shutil.which("kubectl")
    if not found:
        return None
    return [found, "build"] if Path(found).name.startswith("kustomize") else [found, "kustomize"]


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["", "cpu", "queue-hpa"])
def test_kustomize_builds_what_these_tests_check(k8s, folder):
    """The real build (kubectl's kustomize, v5.5.0 in kubectl 1.32 here) equals the documents the tests
    above check, patches applied: the emulation in ``_apply`` is what kustomize does. Skipped where
    neither kustomize nor kubectl exists."""
    command = _kustomize()
    if command is None:
        pytest.skip("no kustomize or kubectl (set KUSTOMIZE to one)")
    out = subprocess.run([*command, str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    built = {doc["kind"]: doc for doc in yaml.safe_load_all(out.stdout) if doc}
    assert built == (_overlay(k8s, folder) if folder else k8s)
