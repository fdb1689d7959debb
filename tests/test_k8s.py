"""The Kubernetes manifests under ``deploy/k8s`` (docs/kubernetes.md).

Every overlay renders with ``kubectl kustomize`` (a child process, so every test here is a
``process`` test), every object validates offline against the Kubernetes 1.32 schemas
(``kubernetes-validate --strict``; custom resources such as the PyTorchJob and ServiceMonitors
only warn), structural rules hold, and a rehearsal runs the rendered containers on this machine:

* each pod of the CPU overlay becomes local processes running the rendered command, arguments and
  environment (``$(VAR)`` expanded as the kubelet does, ConfigMap/Secret/``fieldRef`` values
  resolved: the StatefulSet pod-index label, the Job completion index);
* DNS: every ``<pod>.<headless service>:<port>`` is mapped to ``127.0.0.1:<a free port>`` of that
  pod (pods of one Job share a mapping: only index 0 hosts the rendezvous), bare names and
  ``0.0.0.0`` to ``127.0.0.1``, and each pod's declared container ports in its own arguments and
  files to its free ports;
* volumes: every mount path is a temporary directory (the PersistentVolumeClaim one shared by all
  pods, emptyDirs per pod), ConfigMaps are written there, the token Secret is generated;
* rehearsal-only changes: the job's ``train.steps`` is small, NUMBA_CACHE_DIR is left to the
  repository's warm cache, TMPDIR points into the pod's ``/tmp``.

It starts the train-mode servers, both replica groups of the serving servers and the trainer's
torchrun nodes, waits for readiness through the rendered probes, starts the TorchServe pod
(TorchServe and the publisher), predicts, runs the trainer Job again and checks that the new
dense version is rolled in and the servers hot-loaded the new packets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
VENV_BIN = REPO / ".venv" / "bin"
OVERLAYS = ["cpu", "gpu", "s3"]
K8S_VERSION = "1.32.0"
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def render(directory: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Every overlay, the Kubeflow variant, and the CPU overlay with the ServiceMonitor component."""
    out = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    out["kubeflow"] = render(K8S / "kubeflow")
    monitored = tmp_path_factory.mktemp("monitored")
    (monitored / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "overlays" / "cpu", monitored)],
                "components": [os.path.relpath(K8S / "components" / "servicemonitor", monitored)],
            }
        )
    )
    out["servicemonitor"] = render(monitored)
    return out


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (obj,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return obj


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


# --------------------------------------------------------------------------- rendering and schemas


def test_every_overlay_renders_and_validates_against_the_kubernetes_schemas(rendered, tmp_path):
    import kubernetes_validate

    custom = {("kubeflow.org/v1", "PyTorchJob"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
    wrong, skipped = [], set()
    for name, docs in rendered.items():
        assert docs, name
        for doc in docs:
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                skipped.add((doc["apiVersion"], doc["kind"]))
            except kubernetes_validate.ValidationError as e:
                wrong.append(f"{where}: {e.message} at {list(e.path)}")
    assert not wrong, "\n".join(wrong)
    assert skipped == custom, skipped
    # The CLI agrees (strict; custom resources warn and exit 0).
    files = []
    for name, docs in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files.append(str(path))
    cli = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr


# --------------------------------------------------------------------------- structural rules


def test_every_long_running_container_has_probes_resources_and_runs_as_non_root(rendered):
    wrong = []
    for name in OVERLAYS:
        for obj in rendered[name]:
            if obj["kind"] not in WORKLOADS:
                continue
            spec = pod_spec(obj)
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
                wrong.append(f"{where}: pod securityContext.runAsNonRoot is not true")
            for c in spec["containers"]:
                sc = c.get("securityContext", {})
                if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    wrong.append(f"{where}/{c['name']}: allowPrivilegeEscalation must be false, capabilities drop ALL")
                resources = c.get("resources", {})
                if not {"cpu", "memory"} <= set(resources.get("requests", {})) or "memory" not in resources.get(
                    "limits", {}
                ):
                    wrong.append(f"{where}/{c['name']}: needs cpu and memory requests and a memory limit")
                if obj["kind"] != "Job" and not ("readinessProbe" in c and "livenessProbe" in c):
                    wrong.append(f"{where}/{c['name']}: needs a readinessProbe and a livenessProbe")
                command = c.get("command", [])
                if command[:1] not in (["ctrserve"], ["torchserve"], ["torchrun"]):
                    wrong.append(f"{where}/{c['name']}: command {command} is not a plain ctrserve/torchserve/torchrun")
                if not c["image"].startswith("ctrserve"):
                    wrong.append(f"{where}/{c['name']}: image {c['image']}")
    assert not wrong, "\n".join(wrong)


def test_readiness_means_ready(rendered):
    docs = rendered["cpu"]
    for sts in objects(docs, "StatefulSet"):
        (c,) = pod_spec(sts)["containers"]
        # gRPC health answers SERVING only once the checkpoint is loaded and the packets replayed.
        assert c["readinessProbe"]["grpc"]["port"] == 7001
        assert c["startupProbe"]["grpc"]["port"] == 7001
    ts = named(docs, "Deployment", "torchserve")
    torchserve = next(c for c in pod_spec(ts)["containers"] if c["name"] == "torchserve")
    probe = torchserve["readinessProbe"]["exec"]["command"]
    assert probe[:3] == ["ctrserve", "health", "torchserve"] and "--model=deepctr" in probe, probe


def test_shards_follow_the_pod_ordinal_and_the_topology_agrees(rendered):
    docs = rendered["cpu"]
    topology = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctrserve-topology"))
    data = topology["data"]
    serving = [named(docs, "StatefulSet", f"embedding-r{r}") for r in (0, 1)]
    assert all(s["spec"]["replicas"] == int(data["SERVING_SHARDS"]) for s in serving)
    assert named(docs, "StatefulSet", "embedding-train")["spec"]["replicas"] == int(data["TRAIN_SHARDS"])
    for sts in [*serving, named(docs, "StatefulSet", "embedding-train")]:
        (c,) = pod_spec(sts)["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert (
            env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
            == "metadata.labels['apps.kubernetes.io/pod-index']"
        )
        assert "--shard-index=$(SHARD_INDEX)" in c["args"]
        assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in objects(docs, "Service")}
    # CTRSERVE_EMBEDDING_SERVERS: shard i is pod i of every replica group, through the headless Service.
    expected = ",".join(
        "|".join(f"embedding-r{r}-{i}.embedding:7001" for r in (0, 1)) for i in range(int(data["SERVING_SHARDS"]))
    )
    assert data["CTRSERVE_EMBEDDING_SERVERS"] == expected
    job = named(docs, "Job", "trainer")
    assert job["spec"]["completionMode"] == "Indexed"
    assert f"--nnodes={job['spec']['completions']}" in pod_spec(job)["containers"][0]["args"]
    config = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctrserve-config"))
    servers = yaml.safe_load(config["data"]["job.yml"])["embedding_servers"]
    assert servers == [f"embedding-train-{i}.embedding-train:7001" for i in range(int(data["TRAIN_SHARDS"]))]


def test_only_torchserve_and_trainers_reach_the_embedding_servers(rendered):
    for name in OVERLAYS:
        (policy,) = objects(rendered[name], "NetworkPolicy")
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "embedding-server"}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        grpc_rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 7001} in r["ports"]]
        (rule,) = grpc_rules
        allowed = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
        assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespace or IP blocks
        assert sorted(p["app.kubernetes.io/component"] for p in allowed) == ["torchserve", "trainer"]
        other = [r for r in policy["spec"]["ingress"] if r is not rule]
        assert all(r["ports"] == [{"protocol": "TCP", "port": 9101}] for r in other)  # metrics only
        # Those labels are the ones TorchServe's and the trainer's pods carry.
        labels = {
            pod_labels(named(rendered[name], "Deployment", "torchserve"))["app.kubernetes.io/component"],
            pod_labels(named(rendered[name], "Job", "trainer"))["app.kubernetes.io/component"],
        }
        assert labels == {"torchserve", "trainer"}


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_disruption_budgets_autoscaler_and_scraping(rendered):
    docs = rendered["cpu"]
    budgets = {p["metadata"]["name"]: p["spec"] for p in objects(docs, "PodDisruptionBudget")}
    assert budgets["embedding-serve"]["maxUnavailable"] == 1
    assert "torchserve" in budgets and "embedding-train" in budgets
    (hpa,) = objects(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "torchserve"}
    for obj in objects(docs, "Deployment") + objects(docs, "StatefulSet"):
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        port = int(annotations["prometheus.io/port"])
        declared = {p["containerPort"] for c in pod_spec(obj)["containers"] for p in c.get("ports", [])}
        assert port in declared
    monitors = objects(rendered["servicemonitor"], "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"embedding-servers", "torchserve"}
    services = objects(rendered["servicemonitor"], "Service")
    for monitor in monitors:
        selected = [
            s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert selected and all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in selected)


def test_gpu_overlay_requests_gpus_for_torchserve_and_the_trainer(rendered):
    docs = rendered["gpu"]
    for kind, name, container in (("Deployment", "torchserve", "torchserve"), ("Job", "trainer", "trainer")):
        c = next(c for c in pod_spec(named(docs, kind, name))["containers"] if c["name"] == container)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", name
    assert "nvidia.com/gpu" not in json.dumps(rendered["cpu"])


def test_s3_overlay_takes_credentials_from_a_secret_and_drops_the_volume(rendered):
    docs = rendered["s3"]
    text = json.dumps(docs)
    assert not objects(docs, "PersistentVolumeClaim") and '"model-root"' not in text
    assert not objects(docs, "Secret")  # created by the operator, never rendered from a file here
    topology = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctrserve-topology"))
    assert topology["data"]["MODEL_ROOT"].startswith("s3://")
    assert not re.search(r"AKIA[0-9A-Z]{12,}|access_key:|secret_key:", text)  # no keys in configs
    for obj in docs:
        if obj["kind"] in WORKLOADS:
            for c in pod_spec(obj)["containers"]:
                literal = [e["name"] for e in c.get("env", []) if e["name"].startswith("AWS_") and "value" in e]
                assert not literal, (obj["metadata"]["name"], literal)
    config = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctrserve-config"))
    assert yaml.safe_load(config["data"]["job.yml"])["output"]["model_root"] == topology["data"]["MODEL_ROOT"]
    incremental = yaml.safe_load(config["data"]["global_train.yml"])["embedding_parameter_server_config"]
    assert incremental["incremental_dir"] == topology["data"]["MODEL_ROOT"] + "/incremental"
    storage_containers = [
        ("StatefulSet", "embedding-train", "embedding-server"),
        ("StatefulSet", "embedding-r0", "embedding-server"),
        ("StatefulSet", "embedding-r1", "embedding-server"),
        ("Job", "trainer", "trainer"),
        ("Deployment", "torchserve", "publisher"),
    ]
    for kind, name, container in storage_containers:
        c = next(c for c in pod_spec(named(docs, kind, name))["containers"] if c["name"] == container)
        env = {e["name"]: e for e in c["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "ctrserve-s3", "key": key}, (name, key)
        assert "CTRSERVE_S3_ENDPOINT" in env


def test_configs_in_the_configmap_load_with_their_loaders(rendered, tmp_path):
    from embedding_server.core.config import EmbeddingConfig, GlobalConfig
    from handler.serving_config import ServingConfig
    from trainer.job import JobConfig

    for name in OVERLAYS:
        config = next(
            d for d in objects(rendered[name], "ConfigMap") if d["metadata"]["name"].startswith("ctrserve-config")
        )
        directory = tmp_path / name
        directory.mkdir()
        for file, text in config["data"].items():
            (directory / file).write_text(text)
        EmbeddingConfig.load(directory / "embedding_config.yml")
        GlobalConfig.load(directory / "global_train.yml")
        GlobalConfig.load(directory / "global_infer.yml")
        ServingConfig.load(directory / "serving.yml")
        JobConfig.load(directory / "job.yml")


def test_the_configmaps_logging_file_is_the_one_in_deploy_torchserve():
    """kustomize reads only files under its kustomization, so the ConfigMap holds a copy of
    TorchServe's WARN-level log4j2.xml; it must not drift from deploy/torchserve's."""
    copy = (K8S / "base" / "config" / "log4j2.xml").read_bytes()
    assert copy == (REPO / "deploy" / "torchserve" / "log4j2.xml").read_bytes()


# --------------------------------------------------------------------------- the rehearsal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Pod:
    name: str
    workload: dict
    host: str | None  # <hostname>.<headless service>, as the pod's DNS name
    labels: dict
    annotations: dict
    ports: dict[int, int] = field(default_factory=dict)  # container port -> local port
    dirs: dict[str, Path] = field(default_factory=dict)  # mount path -> local directory
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def spec(self) -> dict:
        return pod_spec(self.workload)


class Rehearsal:
    """The rendered CPU overlay's pods as local processes (module docstring)."""

    def __init__(self, docs: list[dict], root: Path) -> None:
        self.docs, self.root = docs, root
        self.configmaps = {d["metadata"]["name"]: d["data"] for d in objects(docs, "ConfigMap")}
        self.secrets = {
            "ctrserve-embedding-tokens": {"token": secrets.token_hex(32), "admin_token": secrets.token_hex(32)}
        }
        self.shared: dict[str, Path] = {}  # PersistentVolumeClaims
        self.pods: dict[str, Pod] = {}
        self.last_probe = ""
        job_ports: dict[str, dict[int, int]] = {}
        for obj in docs:
            declared = (
                [p["containerPort"] for c in pod_spec(obj)["containers"] for p in c.get("ports", [])]
                if obj["kind"] in WORKLOADS
                else []
            )
            labels = dict(obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}))
            if obj["kind"] == "StatefulSet":
                for i in range(obj["spec"]["replicas"]):
                    name = f"{obj['metadata']['name']}-{i}"
                    pod = Pod(
                        name,
                        obj,
                        f"{name}.{obj['spec']['serviceName']}",
                        {**labels, "apps.kubernetes.io/pod-index": str(i)},
                        {},
                    )
                    pod.ports = {p: free_port() for p in declared}
                    self.pods[name] = pod
            elif obj["kind"] == "Job":
                ports = job_ports.setdefault(obj["metadata"]["name"], {p: free_port() for p in declared})
                for i in range(obj["spec"]["completions"]):
                    name = f"{obj['metadata']['name']}-{i}"
                    host = f"{name}.{pod_spec(obj)['subdomain']}"
                    annotations = {"batch.kubernetes.io/job-completion-index": str(i)}
                    self.pods[name] = Pod(name, obj, host, labels, annotations, dict(ports))
            elif obj["kind"] == "Deployment":
                name = f"{obj['metadata']['name']}-0"  # one replica is enough here
                self.pods[name] = Pod(name, obj, None, labels, {}, {p: free_port() for p in declared})
        for pod in self.pods.values():
            self._mount(pod)

    # ---- volumes and names

    def _mount(self, pod: Pod) -> None:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        by_volume: dict[str, Path] = {}
        for c in pod.spec["containers"]:
            for m in c.get("volumeMounts", []):
                v = volumes[m["name"]]
                if m["name"] not in by_volume:
                    if "persistentVolumeClaim" in v:
                        claim = v["persistentVolumeClaim"]["claimName"]
                        by_volume[m["name"]] = self.shared.setdefault(claim, self.root / f"pvc-{claim}")
                    else:
                        by_volume[m["name"]] = self.root / pod.name / m["name"]
                    by_volume[m["name"]].mkdir(parents=True, exist_ok=True)
                pod.dirs[m["mountPath"]] = by_volume[m["name"]]
        for name, v in volumes.items():
            if name not in by_volume:
                continue
            if "configMap" in v:
                for key, text in self.configmaps[v["configMap"]["name"]].items():
                    (by_volume[name] / key).write_text(self.sub(pod, text))
            elif "secret" in v:
                data = self.secrets[v["secret"]["secretName"]]
                for item in v["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                    (by_volume[name] / item["path"]).write_text(data[item["key"]] + "\n")

    def sub(self, pod: Pod, text: str) -> str:
        """DNS names, ports and mount paths of the cluster mapped onto this machine."""
        for other in sorted(self.pods.values(), key=lambda p: -len(p.host or "")):
            if other.host:
                for port, local in other.ports.items():
                    text = text.replace(f"{other.host}:{port}", f"127.0.0.1:{local}")
                text = re.sub(rf"\b{re.escape(other.host)}\b", "127.0.0.1", text)
        text = text.replace("0.0.0.0", "127.0.0.1")
        for port, local in pod.ports.items():
            text = re.sub(rf"(?<=[:=]){port}\b", str(local), text)
            text = str(local) if text == str(port) else text
        if pod.dirs:  # one pass, longest first: a mapped path is never mapped again
            paths = "|".join(re.escape(path) for path in sorted(pod.dirs, key=len, reverse=True))
            pattern = r"(?<![^\s=\"':,\[])(" + paths + r")(?=/|\b|$)"  # a path, not a URL's path
            text = re.sub(pattern, lambda m: str(pod.dirs[m[1]]), text)
        return text

    # ---- containers

    def environment(self, pod: Pod, container: dict) -> dict[str, str]:
        """The container's environment as Kubernetes gives it (before any mapping)."""
        env: dict[str, str] = {}
        for e in container.get("env", []):
            if "value" in e:
                value = e["value"]
            elif "configMapKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["configMapKeyRef"]
                value = self.configmaps[ref["name"]][ref["key"]]
            elif "secretKeyRef" in e["valueFrom"]:
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            else:
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                assert match, path
                value = (pod.labels if match[1] == "labels" else pod.annotations)[match[2]]
            env[e["name"]] = self.expand(value, env)
        return env

    @staticmethod
    def expand(text: str, env: dict[str, str]) -> str:
        """Kubernetes' $(VAR) expansion (unknown names stay as they are)."""
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)

    def command(self, pod: Pod, container: dict, words: list[str]) -> tuple[list[str], dict[str, str]]:
        env = self.environment(pod, container)
        argv = [self.sub(pod, self.expand(w, env)) for w in words]
        full = {k: v for k, v in os.environ.items() if not k.startswith("CTRSERVE_")}
        full.update({key: self.sub(pod, value) for key, value in env.items()})
        full.pop("NUMBA_CACHE_DIR", None)  # the repository's warm cache stands in for the image's
        tmp = pod.dirs.get("/tmp", self.root / pod.name / "tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        full.update(
            {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp), "TEMP": str(tmp)}
        )
        full.setdefault("OMP_NUM_THREADS", "1")
        return argv, full

    def start(self, pod: Pod, only: str | None = None) -> None:
        for c in pod.spec["containers"]:
            if only and c["name"] != only:
                continue
            argv, env = self.command(pod, c, c.get("command", []) + c.get("args", []))
            cwd = Path(self.sub(pod, c["workingDir"])) if "workingDir" in c else self.root / pod.name
            cwd.mkdir(parents=True, exist_ok=True)
            log = open(self.root / f"{pod.name}.{c['name']}.log", "wb")  # noqa: SIM115 (closed with the process)
            pod.processes.append(
                subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def probe(self, pod: Pod, container_name: str, kind: str = "readinessProbe") -> bool:
        c = next(c for c in pod.spec["containers"] if c["name"] == container_name)
        probe = c[kind]
        if "grpc" in probe:
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(f"127.0.0.1:{pod.ports[probe['grpc']['port']]}") as channel:
                try:
                    answer = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=2
                    )
                except grpc.RpcError:
                    return False
                return answer.status == health_pb2.HealthCheckResponse.SERVING
        if "httpGet" in probe:
            import requests

            url = f"http://127.0.0.1:{pod.ports[probe['httpGet']['port']]}{probe['httpGet']['path']}"
            with contextlib.suppress(requests.RequestException):
                return requests.get(url, timeout=2).status_code == 200
            return False
        argv, env = self.command(pod, c, probe["exec"]["command"])
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        self.last_probe = f"{argv}: exit {done.returncode}: {done.stdout}{done.stderr}"
        return done.returncode == 0

    def wait(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for pod in self.pods.values():
                for p in pod.processes:
                    if p.poll() not in (None, 0):
                        pytest.fail(f"{pod.name} exited {p.returncode} while waiting for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} within {timeout} s (last exec probe: {self.last_probe}):\n{self.logs()}")
            time.sleep(0.5)

    def run_job(self, name: str, timeout: float) -> None:
        pods = [p for p in self.pods.values() if p.workload["kind"] == "Job" and p.workload["metadata"]["name"] == name]
        for pod in pods:
            pod.processes.clear()
            self.start(pod)
        deadline = time.monotonic() + timeout
        for pod in pods:
            for p in pod.processes:
                try:
                    code = p.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{pod.name} still running after {timeout} s:\n{self.logs()}")
                assert code == 0, f"{pod.name} exited {code}:\n{self.logs()}"

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-2500:]}" for f in sorted(self.root.glob("*.log"))
        )

    def stop(self) -> None:
        groups = [p.pid for pod in self.pods.values() for p in pod.processes if p.poll() is None]
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + grace
            for pod in self.pods.values():
                for p in pod.processes:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(max(0.1, deadline - time.monotonic()))
            groups = [p.pid for pod in self.pods.values() for p in pod.processes if p.poll() is None]
            if not groups:
                break


def _predict_full(port: int):
    from handler.client import PredictionClient

    request = {"dense": [[0.5] * 13], "sparse": {f"C{i}": [[i, 1000 + i]] for i in range(1, 27)}}
    with PredictionClient(f"grpc://127.0.0.1:{port}") as client:
        return client.predict_full(json.dumps(request).encode())


@pytest.mark.timeout(400)
def test_rehearsal_the_rendered_pods_train_publish_hot_load_and_serve(rendered):
    docs = json.loads(json.dumps(rendered["cpu"]))
    # Rehearsal-only: a few training steps.
    config = next(d for d in objects(docs, "ConfigMap") if d["metadata"]["name"].startswith("ctrserve-config"))
    job = yaml.safe_load(config["data"]["job.yml"])
    job["train"] = {"steps": 12, "eval_every": 0, "eval_batches": 2, "log_every": 4}
    job["data"]["batch_size"] = 128
    config["data"]["job.yml"] = yaml.safe_dump(job, sort_keys=False)
    root = Path(tempfile.mkdtemp(prefix="k8s-"))
    rehearsal = Rehearsal(docs, root)
    pods = rehearsal.pods
    train = [p for p in pods.values() if p.workload["metadata"]["name"] == "embedding-train"]
    serve = [p for p in pods.values() if p.workload["metadata"]["name"] in ("embedding-r0", "embedding-r1")]
    assert len(train) == 2 and len(serve) == 4
    torchserve = pods["torchserve-0"]
    try:
        for pod in train + serve:
            rehearsal.start(pod)
        rehearsal.wait(lambda: all(rehearsal.probe(p, "embedding-server") for p in train), "train servers ready", 90)
        rehearsal.run_job("trainer", timeout=180)
        model_root = rehearsal.shared["model-root"] / "ctr"
        assert (model_root / "dense" / "v00000001").is_dir(), rehearsal.logs()
        rehearsal.wait(lambda: all(rehearsal.probe(p, "embedding-server") for p in serve), "serving servers ready", 90)

        rehearsal.start(torchserve)
        rehearsal.wait(lambda: rehearsal.probe(torchserve, "torchserve", "livenessProbe"), "TorchServe /ping", 90)
        rehearsal.wait(lambda: rehearsal.probe(torchserve, "torchserve"), "TorchServe's model workers READY", 120)
        assert rehearsal.probe(torchserve, "publisher") and rehearsal.probe(torchserve, "publisher", "livenessProbe")
        grpc_port = torchserve.ports[7070]
        predicted = subprocess.run(
            [
                str(VENV_BIN / "ctrserve"),
                "predict",
                "--grpc",
                f"127.0.0.1:{grpc_port}",
                "--limit",
                "5",
                "--input",
                str(REPO / "deploy" / "examples" / "criteo_sample.tsv"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert predicted.returncode == 0, predicted.stderr
        scores = [float(line) for line in predicted.stdout.split()]
        assert len(scores) == 5 and all(0.0 < s < 1.0 for s in scores)
        first = _predict_full(grpc_port)
        assert first.model_version == 1

        # A second run of the Job: new packets hot-loaded, a new dense version rolled in.
        rehearsal.run_job("trainer", timeout=180)

        def rolled_in() -> bool:
            answer = _predict_full(grpc_port)
            return answer.model_version == 2 and answer.embedding_watermark != first.embedding_watermark

        rehearsal.wait(rolled_in, "dense version 2 served with newer embeddings", 120)
        for p in serve:
            assert rehearsal.probe(p, "embedding-server", "livenessProbe")
    finally:
        rehearsal.stop()
    shutil.rmtree(root, ignore_errors=True)
