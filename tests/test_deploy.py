"""The deployment (deploy/): both kustomize overlays and the Jobs render with kubectl, every object validates
against Kubernetes' schemas (kubernetes-validate), checkov passes on the rendered manifests and both
Dockerfiles, the GPU pod has what Triton needs, and the engine initContainer's script keys its cache by GPU
model and TensorRT release (with stand-ins for nvidia-smi and build-engines). Nothing is built or deployed.

The tools come from `make deploy-tools` (part of `make test`), in .venv/deploy-tools; without them these
tests fail, saying so.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TOOLS = Path(sys.prefix) / "deploy-tools" / "bin"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = {
    "gpu": "k8s/overlays/gpu",
    "cpu": "k8s/overlays/cpu",
    "perf": "k8s/perf",
    "checkpoint": "k8s/checkpoint",
}
ADAPTER_RULES = DEPLOY / "k8s/monitoring/prometheus-adapter-rules.yaml"
DOCKERFILES = {"gpu": DEPLOY / "docker/Dockerfile", "cpu": DEPLOY / "docker/Dockerfile.cpu"}
ENGINE_SCRIPT = DEPLOY / "docker/build-engines-cached.sh"
# Custom resources kubernetes-validate has no schema for; test_podmonitor checks them instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
# The checkov checks skipped by annotations in the manifests (deploy/README.md lists them, with the reason).
SKIPPED_CHECKS = {"CKV_K8S_43"}

Manifest = dict[str, Any]


def tool(name: str) -> Path:
    path = TOOLS / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: run `make deploy-tools` (`make test` does), which installs kubectl, "
            "kubernetes-validate and checkov for these checks"
        )
    return path


def run(*command: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`kubectl kustomize` of each kustomization, one file each, plus the adapter rules as shipped."""
    kubectl = tool("kubectl")
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, folder in KUSTOMIZATIONS.items():
        result = run(kubectl, "kustomize", DEPLOY / folder)
        assert result.returncode == 0, f"kubectl kustomize deploy/{folder} failed:\n{result.stderr}"
        assert not result.stderr.strip(), f"kubectl kustomize deploy/{folder} warned:\n{result.stderr}"
        files[name] = out / f"{name}.yaml"
        files[name].write_text(result.stdout)
    files["adapter-rules"] = out / "prometheus-adapter-rules.yaml"
    shutil.copy(ADAPTER_RULES, files["adapter-rules"])
    return files


def objects(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod: Manifest, name: str) -> Manifest:
    found = [c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def env(c: Manifest) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def mounts(c: Manifest) -> dict[str, Manifest]:
    return {m["name"]: m for m in c.get("volumeMounts", [])}


def volumes(pod: Manifest) -> dict[str, Manifest]:
    return {v["name"]: v for v in pod["volumes"]}


# --------------------------------------------------------------------------------------------------------
# Rendering, schemas, checkov


def test_every_object_validates_against_kubernetes_schemas(rendered: dict[str, Path]) -> None:
    result = run(tool("kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", *rendered.values())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    docs = [doc for path in rendered.values() for doc in objects(path)]
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert crds, "the PodMonitor is gone: update CRD_KINDS"
    # kubernetes-validate only warns about kinds it has no schema for: those must be exactly our CRDs.
    unknown = [line for line in output.splitlines() if line.startswith("WARN")]
    assert len(unknown) == len(crds) and all("kind PodMonitor" in line for line in unknown), output
    assert output.count(" passed for resource ") == len(docs) - len(crds), output


def test_checkov_passes_on_manifests_and_dockerfiles(rendered: dict[str, Path]) -> None:
    files = [*rendered.values(), *DOCKERFILES.values()]
    command = [tool("checkov"), "--framework", "kubernetes", "dockerfile", "--skip-download", "-o", "json"]
    result = run(*command, *(arg for f in files for arg in ("-f", f)))
    reports = json.loads(result.stdout)
    reports = {r["check_type"]: r for r in (reports if isinstance(reports, list) else [reports])}
    assert set(reports) == {"kubernetes", "dockerfile"}, result.stdout[:2000]
    for kind, report in reports.items():
        failed = [
            f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
            for c in report["results"]["failed_checks"]
        ]
        assert not failed, f"checkov {kind}:\n" + "\n".join(failed)
        assert report["summary"]["parsing_errors"] == 0, report["summary"]
        assert report["summary"]["passed"] > 0, report["summary"]
    assert reports["dockerfile"]["summary"]["resource_count"] == len(DOCKERFILES)
    skipped = (
        reports["kubernetes"]["results"]["skipped_checks"]
        + reports["dockerfile"]["results"]["skipped_checks"]
    )
    assert {c["check_id"] for c in skipped} == SKIPPED_CHECKS
    assert all(c["check_result"].get("suppress_comment", "").strip() for c in skipped), skipped
    assert result.returncode == 0


# --------------------------------------------------------------------------------------------------------
# The server pods


def test_gpu_overlay_has_probes_ports_gpu_and_shm(rendered: dict[str, Path]) -> None:
    deployment = one(objects(rendered["gpu"]), "Deployment", "sd-triton")
    pod = deployment["spec"]["template"]["spec"]
    triton, engines = container(pod, "triton"), container(pod, "engines")

    assert {p["name"]: p["containerPort"] for p in triton["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready")):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = triton["startupProbe"]
    ready_timeout = float(triton["args"][triton["args"].index("--ready-timeout") + 1])
    assert startup["periodSeconds"] * startup["failureThreshold"] >= ready_timeout >= 600, (
        "room for engine loading"
    )

    for c in (triton, engines):  # the initContainer builds TensorRT engines: it needs the GPU too
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1", c["name"]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], c["name"]
    shm = volumes(pod)["shm"]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert mounts(triton)["shm"]["mountPath"] == "/dev/shm"

    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert [e["key"] for t in terms for e in t["matchExpressions"]] == ["nvidia.com/gpu.product"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert engines["command"] == ["build-engines-cached"] and env(engines)["SD_ENGINE_TARGET"] == "tensorrt"


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_server_pod_serves_what_the_engine_container_links(rendered: dict[str, Path], overlay: str) -> None:
    pod = one(objects(rendered[overlay]), "Deployment", "sd-triton")["spec"]["template"]["spec"]
    triton, engines = container(pod, "triton"), container(pod, "engines")
    args = triton["args"]
    assert triton["command"] == ["sd-serve"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    link = env(engines)["SD_MODEL_REPOSITORY"]
    assert args[args.index("--model-repository") + 1] == link
    # The link and the folder it points into must be at the same paths in both containers.
    for path in (link, env(engines)["SD_ENGINE_CACHE"]):
        shared = [
            name
            for name, m in mounts(engines).items()
            if f"{path}/".startswith(m["mountPath"].rstrip("/") + "/")
        ]
        assert len(shared) == 1, path
        assert mounts(triton)[shared[0]]["mountPath"] == mounts(engines)[shared[0]]["mountPath"], path
    assert env(engines)["SD_CHECKPOINT"].startswith(mounts(engines)["checkpoint"]["mountPath"] + "/")
    if overlay == "cpu":
        assert env(engines)["SD_ENGINE_TARGET"] == "openvino"
        assert engines["args"][engines["args"].index("--precision") + 1] == "fp32"
        assert "nvidia.com/gpu" not in rendered[overlay].read_text()


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_server_pod_security(rendered: dict[str, Path], overlay: str) -> None:
    deployment = one(objects(rendered[overlay]), "Deployment", "sd-triton")
    pod = deployment["spec"]["template"]["spec"]
    user = int(image_user(DOCKERFILES[overlay]).split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == user, "must be the image's USER"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    pvcs = {name for name, v in volumes(pod).items() if "persistentVolumeClaim" in v}
    for c in pod["initContainers"] + pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        writable = {name for name, m in mounts(c).items() if not m.get("readOnly")}
        # Writable: emptyDirs, and the engine cache where engines are built into it; never the checkpoint.
        assert writable - pvcs <= {n for n, v in volumes(pod).items() if "emptyDir" in v}, c["name"]
        assert writable & pvcs <= ({"engine-cache"} if c["name"] == "engines" else set()), c["name"]
        cache = image_env(DOCKERFILES[overlay])["XDG_CACHE_HOME"]
        assert any(m["mountPath"] == cache and name in writable for name, m in mounts(c).items()), c["name"]
        assert any(m["mountPath"] == "/tmp" and name in writable for name, m in mounts(c).items()), c["name"]


# --------------------------------------------------------------------------------------------------------
# Service, scaling, monitoring, network


def test_service_hpa_pdb_and_adapter_rule(rendered: dict[str, Path]) -> None:
    docs = objects(rendered["gpu"])
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "sd-triton")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "sd-triton",
    }
    metrics = {m["pods"]["metric"]["name"]: m for m in hpa["spec"]["metrics"]}
    assert {m["type"] for m in metrics.values()} == {"Pods"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600, "engines load slowly"

    config = yaml.safe_load(one(objects(rendered["adapter-rules"]), "ConfigMap")["data"]["config.yaml"])
    rules = {rule["name"]["as"]: rule for rule in config["rules"]}
    assert set(rules) == set(metrics), "each HPA metric has its adapter rule"
    # Streaming clients' load counts too, and every checkpoint's (NAME_pipeline...); pipeline_control's not.
    both = re.escape('model=~"(.+_)?pipeline(_stream)?"')
    pattern = re.compile(r"(.+_)?pipeline(_stream)?")
    served = ["pipeline", "pipeline_stream", "anime_pipeline", "anime_pipeline_stream"]
    assert all(pattern.fullmatch(m) for m in served)
    assert not any(pattern.fullmatch(m) for m in ("pipeline_control", "unet", "anime_unet"))
    query = rules["sd_triton_queue_time_per_request_us"]["metricsQuery"]
    for series in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert re.search(rf"rate\({series}\{{<<\.LabelMatchers>>,{both}\}}\[1m\]\)", query), series
    assert query.index("nv_inference_queue_duration_us") < query.index("/") < query.index("request_success")
    # Requests that wait inside the pipeline model for a worker are counted with those in Triton's queue.
    query = rules["sd_triton_requests_waiting"]["metricsQuery"]
    assert re.search(r"sd_requests_waiting\{<<\.LabelMatchers>>\}", query)
    assert re.search(rf"nv_inference_pending_request_count\{{<<\.LabelMatchers>>,{both}\}}", query)


def test_termination_grace_covers_the_drain(rendered: dict[str, Path]) -> None:
    """Kubernetes kills the pod at terminationGracePeriodSeconds, counted from the preStop hook's start: it
    must cover the preStop delay, sd-serve's --grace-period and Triton's own exit after it."""
    from services.serve import TRITON_EXIT_TIMEOUT_S

    for overlay in ("gpu", "cpu"):
        pod = one(objects(rendered[overlay]), "Deployment")["spec"]["template"]["spec"]
        triton = container(pod, "triton")
        args = triton["args"]
        grace = float(args[args.index("--grace-period") + 1])
        pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep" and int(pre_stop[1]) >= 5, (
            "load balancers need a moment to stop routing"
        )
        needed = int(pre_stop[1]) + grace + TRITON_EXIT_TIMEOUT_S + 5  # sd-serve kills Triton 5 s after that
        assert pod["terminationGracePeriodSeconds"] >= needed + 10, (
            pod["terminationGracePeriodSeconds"],
            needed,
        )


def test_podmonitor(rendered: dict[str, Path]) -> None:
    """What kubernetes-validate cannot check for the PodMonitor custom resource."""
    docs = objects(rendered["gpu"])
    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    pod = one(docs, "Deployment")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert "metrics" in {p["name"] for p in container(pod["spec"], "triton")["ports"]}


# A NetworkPolicy evaluator for the tests below: which peers a policy lets in or out, on which port.
Peer = dict[str, Any]  # {"namespace": name, "labels": {...}} for a pod, {"ip": "a.b.c.d"} for an address


def pod_peer(namespace: str, **labels: str) -> Peer:
    return {"namespace": namespace, "labels": labels}


def address(ip: str) -> Peer:
    return {"ip": ip}


KUBE_DNS = pod_peer("kube-system", **{"k8s-app": "kube-dns"})
METADATA = address("169.254.169.254")  # the cloud's instance metadata service
PUBLIC = address("18.239.50.1")  # an address outside every private range (a CDN's)


def selects(selector: Manifest, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        ok = {
            "In": value in e.get("values", []),
            "NotIn": value not in e.get("values", []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[e["operator"]]
        if not ok:
            return False
    return True


def peer_matches(rule_peer: Manifest, policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        if "ip" not in peer:
            return False  # pods are matched by selectors here (their IPs being unknown)
        ip, block = ipaddress.ip_address(peer["ip"]), rule_peer["ipBlock"]
        excepted = [ipaddress.ip_network(n) for n in block.get("except", [])]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(ip in n for n in excepted)
    if "ip" in peer:
        return False
    # The API server labels every namespace with its name.
    namespace_labels = {"kubernetes.io/metadata.name": peer["namespace"]}
    if "namespaceSelector" in rule_peer:
        in_namespace = selects(rule_peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = peer["namespace"] == policy_namespace
    return in_namespace and selects(rule_peer.get("podSelector", {}), peer["labels"])


def allows(policy: Manifest, direction: str, peer: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether `policy` lets `peer` in (direction "ingress") or out to it ("egress") on `port`; a policy that
    does not isolate that direction allows everything."""
    spec = policy["spec"]
    if direction.capitalize() not in spec.get("policyTypes", ["Ingress"]):
        return True
    for rule in spec.get(direction) or []:
        ports = rule.get("ports") or [{}]
        if not any(p.get("protocol", "TCP") == protocol and p.get("port", port) == port for p in ports):
            continue
        peers = rule.get("from" if direction == "ingress" else "to")
        if not peers or any(peer_matches(r, policy["metadata"]["namespace"], peer) for r in peers):
            return True
    return False


def overlay_client_namespaces(overlay: str) -> list[str]:
    """The client namespaces an overlay's kustomization.yaml sets in the server's NetworkPolicy."""
    kustomization = yaml.safe_load((DEPLOY / KUSTOMIZATIONS[overlay] / "kustomization.yaml").read_text())
    [patch] = [p for p in kustomization["patches"] if p.get("target", {}).get("kind") == "NetworkPolicy"]
    [operation] = yaml.safe_load(patch["patch"])
    return list(operation["value"])


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_network_policy(rendered: dict[str, Path], overlay: str) -> None:
    docs = objects(rendered[overlay])
    policy = one(docs, "NetworkPolicy", "sd-triton")
    server = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], server)
    client = {"sd-triton/client": "true"}
    namespaces = overlay_client_namespaces(overlay)
    perf_namespace = yaml.safe_load((DEPLOY / KUSTOMIZATIONS["perf"] / "kustomization.yaml").read_text())
    assert perf_namespace["namespace"] in namespaces, "the perf Job's requests must get through"

    for namespace in namespaces:
        assert allows(policy, "ingress", pod_peer(namespace, **client), 8001)
        assert allows(policy, "ingress", pod_peer(namespace, **client), 8000)
        assert not allows(policy, "ingress", pod_peer(namespace, **client), 8002)
        assert not allows(policy, "ingress", pod_peer(namespace), 8001), "unlabelled pods"
    # A pod labelled as a client in a namespace not listed: any namespace owner could label their pods.
    assert not allows(policy, "ingress", pod_peer("someone-elses", **client), 8001)
    assert not allows(policy, "ingress", address("10.0.0.7"), 8001)
    prometheus = pod_peer("monitoring", **{"app.kubernetes.io/name": "prometheus"})
    assert allows(policy, "ingress", prometheus, 8002) and not allows(policy, "ingress", prometheus, 8001)

    # No egress at all: not DNS, not the cloud metadata service, not other pods, not the internet.
    for peer, port, protocol in (
        (KUBE_DNS, 53, "UDP"),
        (METADATA, 80, "TCP"),
        (PUBLIC, 443, "TCP"),
        (pod_peer("sd-triton", **server), 8001, "TCP"),
    ):
        assert not allows(policy, "egress", peer, port, protocol), (peer, port)


def test_client_namespaces_are_set_in_the_overlay(tmp_path: Path) -> None:
    """The overlay's list is what the rendered NetworkPolicy admits (rendered from a copy of deploy/k8s with
    one namespace added there)."""
    copy = tmp_path / "k8s"
    shutil.copytree(DEPLOY / "k8s", copy)
    kustomization = copy / "overlays/gpu/kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("value: [sd-triton]") == 1
    kustomization.write_text(text.replace("value: [sd-triton]", "value: [sd-triton, team-a]"))
    result = run(tool("kubectl"), "kustomize", copy / "overlays/gpu")
    assert result.returncode == 0, result.stderr
    policy = one([d for d in yaml.safe_load_all(result.stdout) if d], "NetworkPolicy", "sd-triton")
    client = {"sd-triton/client": "true"}
    assert allows(policy, "ingress", pod_peer("team-a", **client), 8001)
    assert not allows(policy, "ingress", pod_peer("team-b", **client), 8001)


def test_job_network_policies(rendered: dict[str, Path]) -> None:
    # The checkpoint download: DNS and HTTPS to public addresses only, never the cloud metadata service.
    docs = objects(rendered["checkpoint"])
    policy = one(docs, "NetworkPolicy", "sd-checkpoint-download")
    job = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], job)
    assert allows(policy, "egress", KUBE_DNS, 53, "UDP") and allows(policy, "egress", KUBE_DNS, 53, "TCP")
    assert allows(policy, "egress", PUBLIC, 443) and allows(
        policy, "egress", address("2600:9000:2000::1"), 443
    )
    assert not allows(policy, "egress", PUBLIC, 80)
    for blocked in (
        "169.254.169.254",
        "fd00:ec2::254",
        "10.96.0.1",
        "172.20.0.10",
        "192.168.1.1",
        "100.64.0.1",
    ):
        assert not allows(policy, "egress", address(blocked), 443), blocked
        assert not allows(policy, "egress", address(blocked), 80), blocked
    assert not allows(policy, "ingress", pod_peer("sd-triton"), 8000)

    # The perf Job: DNS, and the server pods' gRPC port, which their own policy opens to it.
    docs = objects(rendered["perf"])
    policy = one(docs, "NetworkPolicy", "sd-triton-perf")
    perf = one(docs, "Job")
    assert selects(policy["spec"]["podSelector"], perf["spec"]["template"]["metadata"]["labels"])
    gpu = objects(rendered["gpu"])
    server = pod_peer("sd-triton", **one(gpu, "Deployment")["spec"]["template"]["metadata"]["labels"])
    assert allows(policy, "egress", KUBE_DNS, 53, "UDP") and allows(policy, "egress", server, 8001)
    for peer, port in ((server, 8000), (METADATA, 80), (PUBLIC, 443), (pod_peer("other", app="x"), 8001)):
        assert not allows(policy, "egress", peer, port), (peer, port)
    perf_pod = pod_peer(perf["metadata"]["namespace"], **perf["spec"]["template"]["metadata"]["labels"])
    assert allows(one(gpu, "NetworkPolicy", "sd-triton"), "ingress", perf_pod, 8001)
    assert not allows(policy, "ingress", pod_peer("sd-triton"), 8000)


def test_perf_job_runs_perf_analyzer_with_the_project_inputs(rendered: dict[str, Path]) -> None:
    docs = objects(rendered["perf"])
    pod = one(docs, "Job", "sd-triton-perf")["spec"]["template"]
    assert pod["metadata"]["labels"]["sd-triton/client"] == "true", (
        "else the NetworkPolicy drops its requests"
    )
    perf = container(pod["spec"], "perf-analyzer")
    triton_version = dockerfile_args(DOCKERFILES["gpu"])["TRITON_VERSION"]
    assert perf["image"] == f"nvcr.io/nvidia/tritonserver:{triton_version}-py3-sdk"
    args = perf["args"]
    assert perf["command"] == ["perf_analyzer"]
    assert args[args.index("-m") + 1] == "pipeline" and args[args.index("-i") + 1] == "grpc"
    service = one(objects(rendered["gpu"]), "Service", "sd-triton")
    assert args[args.index("-u") + 1] == f"{service['metadata']['name']}:8001"
    inputs = container(pod["spec"], "inputs")
    source, target = inputs["command"][-2:]
    assert source == "/opt/sd-triton/perf/inputs/." and target == "/inputs/"
    data = Path(args[args.index("--input-data") + 1])
    assert data.parent == Path("/inputs") and (ROOT / "perf/inputs" / data.name).is_file()
    for dockerfile in DOCKERFILES.values():
        assert ("COPY", "perf perf/") in final_stage(dockerfile), "the images carry perf/inputs"


# --------------------------------------------------------------------------------------------------------
# Rollouts, drains, placement, memory, balancing

# The first pod of a new image on a GPU type builds its engines before it loads them: ONNX export and TensorRT
# plans, tens of minutes for a full-size UNet (deploy/README.md, 4.).
ENGINE_BUILD_ALLOWANCE_S = 3600
# What the server and its python model processes may use, besides the memory-backed /dev/shm.
SERVER_MEMORY = 16 * 2**30


def quantity(value: str | int) -> int:
    """A Kubernetes memory quantity in bytes (binary suffixes, as the manifests use)."""
    text = str(value)
    for suffix, power in (("Ki", 1), ("Mi", 2), ("Gi", 3), ("Ti", 4)):
        if text.endswith(suffix):
            return int(text.removesuffix(suffix)) * 1024**power
    return int(text)


def rolling_update_bounds(strategy: Manifest, replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable) as the Deployment controller resolves them: percentages of the replicas,
    surge rounded up, unavailable down, and at least one of the two not 0."""

    def resolve(value: int | str, round_up: bool) -> int:
        if isinstance(value, int):
            return value
        exact = replicas * int(value.removesuffix("%")) / 100
        return math.ceil(exact) if round_up else math.floor(exact)

    rolling = strategy.get("rollingUpdate", {})
    surge = resolve(rolling.get("maxSurge", "25%"), round_up=True)
    unavailable = resolve(rolling.get("maxUnavailable", "25%"), round_up=False)
    return surge, (1 if surge == unavailable == 0 else unavailable)


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_rollouts_progress_and_keep_a_pod_serving(rendered: dict[str, Path], overlay: str) -> None:
    docs = objects(rendered[overlay])
    spec = one(docs, "Deployment")["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    startup = container(spec["template"]["spec"], "triton")["startupProbe"]
    loading = startup["periodSeconds"] * startup["failureThreshold"]
    # Else a new GPU type or image ends in ProgressDeadlineExceeded while its first pod builds and loads.
    assert spec["progressDeadlineSeconds"] >= ENGINE_BUILD_ALLOWANCE_S + loading
    assert spec["strategy"]["type"] == "RollingUpdate"
    for replicas in range(hpa["minReplicas"], hpa["maxReplicas"] + 1):
        surge, unavailable = rolling_update_bounds(spec["strategy"], replicas)
        assert replicas - unavailable >= 1, f"{replicas} replicas: a pod keeps serving during a rollout"
        if overlay == "gpu":  # the surge pod stays Pending in a full GPU pool: an old pod must make room
            assert unavailable >= 1, f"{replicas} replicas: the rollout needs a spare GPU"


def test_a_node_drain_leaves_a_server_pod(rendered: dict[str, Path]) -> None:
    docs = objects(rendered["gpu"])
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert pdb["maxUnavailable"] >= 1, "else no drain could ever evict a server pod"
    assert hpa["minReplicas"] - pdb["maxUnavailable"] >= 1, "a drain would take the only server pod"


def node_fits(pod: Manifest, labels: dict[str, str]) -> bool:
    """Whether a node with `labels` meets the pod's required node affinity (the operators used here)."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    return any(selects({"matchExpressions": t["matchExpressions"]}, labels) for t in terms)


def test_gpu_affinity_matches_shared_gpus_of_the_listed_products(rendered: dict[str, Path]) -> None:
    pod = one(objects(rendered["gpu"]), "Deployment")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    [[expression]] = [t["matchExpressions"] for t in terms]
    assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In"
    products = [v for v in expression["values"] if not v.endswith("-SHARED")]
    assert products
    for product in products:
        assert node_fits(pod, {"nvidia.com/gpu.product": product}), product
        # GPU feature discovery's label on a time-sliced or MPS-shared GPU (renameByDefault: false).
        assert node_fits(pod, {"nvidia.com/gpu.product": f"{product}-SHARED"}), product
    assert not node_fits(pod, {"nvidia.com/gpu.product": "Tesla-T4"}) and not node_fits(pod, {})


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_shared_memory_counts_in_the_memory_limit(rendered: dict[str, Path], overlay: str) -> None:
    pod = one(objects(rendered[overlay]), "Deployment")["spec"]["template"]["spec"]
    shm = volumes(pod)["shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and mounts(container(pod, "triton"))["shm"]["mountPath"] == "/dev/shm"
    size = quantity(shm["sizeLimit"])
    assert size >= 256 * 2**20, (
        "the python backend's regions grow with the tensors (container default: 64 MB)"
    )
    limit = quantity(container(pod, "triton")["resources"]["limits"]["memory"])
    assert limit - size >= SERVER_MEMORY, "a full /dev/shm would leave the server less than its budget"


def test_headless_service_for_client_side_grpc_balancing(rendered: dict[str, Path]) -> None:
    docs = objects(rendered["gpu"])
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "sd-triton-grpc")["spec"]
    assert service["clusterIP"] == "None", "headless: DNS answers with every ready pod"
    assert service["selector"].items() <= pod_labels.items()
    assert not service.get("publishNotReadyAddresses"), "only ready pods"
    [port] = service["ports"]
    assert port["port"] == 8001 and port["targetPort"] == "grpc" and port["appProtocol"] == "grpc"


def test_readme_grpc_client_balances_requests_over_the_headless_service(
    rendered: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs deploy/README.md's tritonclient example with gRPC's channel constructor recorded: its target is
    the headless Service through gRPC's DNS resolver, with round_robin, and it keeps the message size limits
    that tritonclient sets by default (its channel_args replace them)."""
    import grpc
    import tritonclient.grpc

    readme = (DEPLOY / "README.md").read_text()
    [example] = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "round_robin" in b]
    channels: list[tuple[str, dict[str, Any]]] = []
    insecure_channel = grpc.insecure_channel

    def record(target: str, options: list[tuple[str, Any]] | None = None, **_: Any) -> grpc.Channel:
        channels.append((target, dict(options or [])))
        return insecure_channel(target, options)  # gRPC accepts the target and options; it connects lazily

    monkeypatch.setattr(grpc, "insecure_channel", record)
    tritonclient.grpc.InferenceServerClient("127.0.0.1:1")  # tritonclient's defaults
    exec(compile(example, "deploy/README.md", "exec"), {})
    [(_, defaults), (target, options)] = channels

    docs = objects(rendered["gpu"])
    service = one(docs, "Service", "sd-triton-grpc")
    namespace = service["metadata"]["namespace"]
    assert target == f"dns:///{service['metadata']['name']}.{namespace}.svc.cluster.local:8001"
    assert options["grpc.lb_policy_name"] == "round_robin"
    for name in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        assert options[name] == defaults[name], name


def test_perf_job_spreads_its_connections(rendered: dict[str, Path]) -> None:
    perf = container(one(objects(rendered["perf"]), "Job")["spec"]["template"]["spec"], "perf-analyzer")
    assert env(perf)["TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"] == "1", (
        "one connection per concurrent client"
    )


# --------------------------------------------------------------------------------------------------------
# The Dockerfiles, statically (they are never built here)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    buffer = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        buffer += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = buffer.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
            buffer = ""
    return result


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(a.partition("=")[::2] for k, a in instructions(path) if k == "ARG" and "=" in a)


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    start = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[start:]


def image_user(path: Path) -> str:
    return [a for k, a in final_stage(path) if k == "USER"][-1]


def image_env(path: Path) -> dict[str, str]:
    pairs = [p for k, a in final_stage(path) if k == "ENV" for p in a.split()]
    return dict(p.partition("=")[::2] for p in pairs)


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_dockerfile(target: str) -> None:
    path = DOCKERFILES[target]
    steps, final, args = instructions(path), final_stage(path), dockerfile_args(path)
    froms = [a for k, a in steps if k == "FROM"]
    for base in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base.split()[0])
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image
    if target == "gpu":
        assert re.fullmatch(r"\d\d\.\d\d", args["TRITON_VERSION"])
        assert froms[-1] == "nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3"
    user = image_user(path)
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:"), "numeric, non-root"
    assert ("EXPOSE", "8000 8001 8002") in final
    assert any(k == "HEALTHCHECK" for k, _ in final)
    assert ("COPY", "deploy/docker/build-engines-cached.sh /usr/local/bin/build-engines-cached") in final
    assert os.stat(ENGINE_SCRIPT).st_mode & stat.S_IXUSR, "COPY keeps the mode: the script must be executable"
    run_steps = " ".join(a for k, a in final if k == "RUN")
    assert not re.search(r"apt-get|apk add|\b(gcc|g\+\+|make|build-essential)\b", run_steps), "no build tools"
    for keyword, arguments in steps:  # every path copied from the context exists and is not .dockerignored
        if keyword == "COPY" and "--from=" not in arguments:
            for source in arguments.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert not dockerignored(source), source


def dockerignored(source: str) -> bool:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    parts = Path(source).parts
    return any(
        Path(*parts[: i + 1]).match(p.removeprefix("**/")) for p in patterns for i in range(len(parts))
    )


# --------------------------------------------------------------------------------------------------------
# The engine cache script, with stand-ins for nvidia-smi and build-engines


# The commands the script and the stand-ins use, linked into a folder of their own so that no real nvidia-smi
# (or build-engines) can be found.
ENGINE_SCRIPT_COMMANDS = "cp flock head id ln mkdir mv rm sed sha256sum sort stat tr".split()
# The stand-in for build-engines: logs its arguments, appends "partial" to <output>/progress, fails if told
# to, else appends "done". So a repository's progress file tells how it was made: "partial done" fresh, one
# more "partial" per interrupted attempt resumed, the seed's lines first when started from a copy of another
# build.
FAKE_BUILD_ENGINES = """#!/bin/sh
echo "$@" >> "$BUILD_LOG"
out=
while [ $# -gt 0 ]; do [ "$1" = --output ] && out=$2; shift; done
mkdir -p "$out"
echo partial >> "$out/progress"
[ -z "$BUILD_FAILS" ] || exit 3
echo done >> "$out/progress"
"""
FRESH = "partial\ndone\n"


def link_commands(folder: Path) -> None:
    folder.mkdir()
    for name in ENGINE_SCRIPT_COMMANDS:
        found = shutil.which(name)
        assert found, f"{name} is needed by deploy/docker/build-engines-cached.sh"
        (folder / name).symlink_to(found)


@pytest.fixture
def engine_env(tmp_path: Path) -> dict[str, str]:
    bin_dir, lib_dir = tmp_path / "bin", tmp_path / "lib"
    for folder in (bin_dir, lib_dir):
        folder.mkdir()
    link_commands(tmp_path / "system")
    (lib_dir / "libnvinfer.so.10.8.0").touch()  # what the key reads, as sd-serve's engine check does
    fake_build = bin_dir / "build-engines"
    fake_build.write_text(FAKE_BUILD_ENGINES)
    fake_build.chmod(0o755)
    return {
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), str(tmp_path / "system")]),
        "LD_LIBRARY_PATH": str(lib_dir),
        "BUILD_LOG": str(tmp_path / "build.log"),
        "SD_CHECKPOINT": "/models/stable-diffusion-v1-4",
        "SD_ENGINE_CACHE": str(tmp_path / "cache"),
        "SD_MODEL_REPOSITORY": str(tmp_path / "model-repository"),
        "HOME": str(tmp_path),
    }


def set_gpu(environment: dict[str, str], name: str | None) -> None:
    smi = Path(environment["PATH"].split(os.pathsep)[0]) / "nvidia-smi"
    if name is None:
        smi.unlink(missing_ok=True)
    else:
        smi.write_text(f"#!/bin/sh\necho '{name}'\n")
        smi.chmod(0o755)


def run_engines(environment: dict[str, str], target: str, *options: str, **extra: str) -> tuple[int, str]:
    bash = shutil.which("bash")
    assert bash
    result = run(bash, ENGINE_SCRIPT, *options, env={**environment, "SD_ENGINE_TARGET": target, **extra})
    return result.returncode, result.stderr


def builds(environment: dict[str, str]) -> list[str]:
    """The calls of build-engines so far, one line of arguments each."""
    log = Path(environment["BUILD_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def published(key: Path) -> dict[str, Path]:
    """The finished builds of a cache key: {the options they were built with: their folder}."""
    found = {}
    for folder in key.iterdir():
        if re.fullmatch(r"[0-9a-f]{64}", folder.name):
            stamp = (folder / "stamp").read_bytes()
            assert hashlib.sha256(stamp).hexdigest() == folder.name, "a build's folder is named by its stamp"
            [options] = [line for line in stamp.decode().splitlines() if line.startswith("options=")]
            found[options.removeprefix("options=")] = folder
    return found


def linked(environment: dict[str, str]) -> Path:
    return Path(environment["SD_MODEL_REPOSITORY"]).resolve()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


H100 = ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3-trt10.8.0")


def test_engine_cache_keyed_by_gpu_model_and_tensorrt(engine_env: dict[str, str]) -> None:
    cache = Path(engine_env["SD_ENGINE_CACHE"])
    set_gpu(engine_env, H100[0])
    code, log = run_engines(engine_env, "tensorrt", "--max-size", "768")
    assert code == 0, log
    key = cache / H100[1]
    [build] = published(key).values()
    assert builds(engine_env) == [
        f"--checkpoint /models/stable-diffusion-v1-4 --output {key}/.build-{build.name}/repo "
        f"--target tensorrt --timing-cache {key}/tensorrt-timing.cache --max-size 768"
    ]
    assert linked(engine_env) == (build / "repo").resolve()
    assert (build / "repo/progress").read_text() == FRESH

    code, log = run_engines(engine_env, "tensorrt", "--max-size", "768")  # another pod, same GPU type
    assert code == 0 and "up to date" in log, log
    assert len(builds(engine_env)) == 1

    set_gpu(engine_env, "NVIDIA A10G")  # a mixed fleet: one cache entry per GPU type
    assert run_engines(engine_env, "tensorrt", "--max-size", "768")[0] == 0
    [a10g] = published(cache / "nvidia-a10g-trt10.8.0").values()
    assert linked(engine_env) == (a10g / "repo").resolve()
    assert len(builds(engine_env)) == 2

    set_gpu(engine_env, H100[0])  # other build options: build-engines runs again, into a build of their own
    assert run_engines(engine_env, "tensorrt", "--max-size", "512")[0] == 0
    assert builds(engine_env)[-1].endswith("--max-size 512") and len(builds(engine_env)) == 3
    assert set(published(key)) == {"--max-size 768", "--max-size 512"}


def test_engine_cache_builds_beside_what_pods_serve(engine_env: dict[str, str]) -> None:
    """A build that pods serve is never written again: a new image or other options build into a folder of
    their own (starting from a copy), and two versions in one cache no longer rebuild each other."""
    set_gpu(engine_env, H100[0])
    key = Path(engine_env["SD_ENGINE_CACHE"]) / H100[1]
    assert run_engines(engine_env, "tensorrt", "--max-size", "768")[0] == 0
    old = published(key)["--max-size 768"]
    served = files(old / "repo")

    code, log = run_engines(engine_env, "tensorrt", "--max-size", "512")  # the new version's first pod
    assert code == 0, log
    new = published(key)["--max-size 512"]
    assert files(old / "repo") == served, "the build the old pods serve was modified"
    assert (new / "repo/progress").read_text() == FRESH + FRESH, "starts from a copy of the build in use"
    assert linked(engine_env) == (new / "repo").resolve()

    # An old pod restarting during the rollout, then a new one: each links its own build, nothing is rebuilt.
    code, log = run_engines(engine_env, "tensorrt", "--max-size", "768")
    assert code == 0 and "up to date" in log and linked(engine_env) == (old / "repo").resolve(), log
    assert run_engines(engine_env, "tensorrt", "--max-size", "512")[0] == 0
    assert linked(engine_env) == (new / "repo").resolve()
    assert len(builds(engine_env)) == 2 and files(old / "repo") == served
    assert not [p for p in key.iterdir() if p.name.startswith(".build-")]


def test_engine_cache_interrupted_build_resumes_and_is_never_served(engine_env: dict[str, str]) -> None:
    set_gpu(engine_env, "NVIDIA L4")
    key = Path(engine_env["SD_ENGINE_CACHE"]) / "nvidia-l4-trt10.8.0"
    code, log = run_engines(engine_env, "tensorrt", BUILD_FAILS="1")
    assert code != 0, log
    assert not published(key) and not os.path.lexists(engine_env["SD_MODEL_REPOSITORY"])
    [work] = [p for p in key.iterdir() if p.name.startswith(".build-")]

    code, log = run_engines(engine_env, "tensorrt")  # the pod's next attempt
    assert code == 0 and "resuming" in log, log
    [build] = published(key).values()
    assert build.name == work.name.removeprefix(".build-") and not work.exists()
    assert (build / "repo/progress").read_text() == "partial\n" + FRESH, "resumed where it stopped"
    assert linked(engine_env) == (build / "repo").resolve() and len(builds(engine_env)) == 2


def test_engine_cache_removes_builds_no_pod_may_serve(engine_env: dict[str, str]) -> None:
    """After a build, the builds beyond the SD_ENGINE_CACHE_KEEP (2) most recently linked are removed, and so
    are abandoned partial builds; the previous build, which the old version's pods serve, stays."""
    set_gpu(engine_env, H100[0])
    key = Path(engine_env["SD_ENGINE_CACHE"]) / H100[1]
    for size in ("512", "640", "512"):  # the last one links 512 again: now the most recently used after 640
        assert run_engines(engine_env, "tensorrt", "--max-size", size)[0] == 0
    assert set(published(key)) == {"--max-size 512", "--max-size 640"}, "nothing removed without a build"
    abandoned = key / f".build-{'f' * 64}"
    (abandoned / "repo").mkdir(parents=True)

    code, log = run_engines(engine_env, "tensorrt", "--max-size", "768")
    assert code == 0, log
    assert set(published(key)) == {"--max-size 768", "--max-size 512"}, log
    assert not abandoned.exists() and not [p for p in key.iterdir() if p.name.startswith(".remove-")]

    code, log = run_engines(engine_env, "tensorrt", "--max-size", "1024", SD_ENGINE_CACHE_KEEP="3")
    assert code == 0, log
    assert set(published(key)) == {"--max-size 1024", "--max-size 768", "--max-size 512"}
    code, log = run_engines(engine_env, "tensorrt", "--max-size", "768", SD_ENGINE_CACHE_KEEP="1")
    assert code != 0 and "SD_ENGINE_CACHE_KEEP must be a number of builds, at least 2" in log, log


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_engine_cache_cpu_targets_need_no_gpu(engine_env: dict[str, str], target: str) -> None:
    set_gpu(engine_env, None)
    code, log = run_engines(engine_env, target)
    assert code == 0, log
    key = Path(engine_env["SD_ENGINE_CACHE"]) / target
    [build] = published(key).values()
    output = f"{key}/.build-{build.name}/repo"
    checkpoint = "/models/stable-diffusion-v1-4"
    assert builds(engine_env) == [f"--checkpoint {checkpoint} --output {output} --target {target}"]


def test_engine_cache_failures_are_clear(engine_env: dict[str, str]) -> None:
    set_gpu(engine_env, None)
    code, log = run_engines(engine_env, "tensorrt")
    assert code != 0 and "nvidia-smi is not on PATH" in log, log
    code, log = run_engines(engine_env, "")
    assert code != 0 and "SD_ENGINE_TARGET must be tensorrt, openvino or onnx" in log, log
    assert not builds(engine_env)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder that another user can enter (pytest's tmp_path is private to ours)."""
    folder = Path(tempfile.mkdtemp(prefix="sd-triton-deploy-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_engine_cache_names_the_cause_when_the_volume_is_not_writable(shared_tmp: Path) -> None:
    """A fresh NFS-like share: owned by root, mode 755, and the pod's user 10001 (fsGroup not applied). Run
    as that user where the tests run as root, else as ourselves with the share made read-only."""
    link_commands(shared_tmp / "system")
    script = shared_tmp / "build-engines-cached"
    shutil.copy(ENGINE_SCRIPT, script)
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)
    bash = shutil.which("bash")
    assert bash
    command: list[str | Path] = [bash, script]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) runs the script as another user"
        command = [setpriv, "--reuid", "10001", "--regid", "10001", "--clear-groups", *command]
        user, mode = "10001", "755"
    else:
        cache.chmod(0o555)
        user, mode = str(os.geteuid()), "555"
    environment = {
        "PATH": str(shared_tmp / "system"),
        "SD_ENGINE_TARGET": "onnx",
        "SD_CHECKPOINT": "/models/stable-diffusion-v1-4",
        "SD_ENGINE_CACHE": str(cache),
        "SD_MODEL_REPOSITORY": str(shared_tmp / "model-repository"),
    }
    try:
        result = run(*command, env=environment)
    finally:
        cache.chmod(0o755)
    assert result.returncode != 0
    log = " ".join(result.stderr.split())
    assert (
        f"cannot write to {cache} (owner uid {cache.stat().st_uid} gid {cache.stat().st_gid}, mode {mode})"
        in log
    )
    assert f"as uid {user}" in log and "fsGroupPolicy is File" in log, log
    section = re.search(r"see deploy/README\.md, '([^']+)'", log)
    assert section, log
    headings = re.findall(r"^#+ (.+)$", (DEPLOY / "README.md").read_text(), re.MULTILINE)
    assert section[1] in headings, "the section the message names"
