"""The deployment files, checked offline against the schemas their tools use.

`cluster.yaml` against the schema inside the installed Ray wheel (and Ray's own
config preparation); the KubeRay manifests in infra/kuberay against the KubeRay
v1.7.0 CRDs in ../shared/schemas/kuberay, made strict about unknown fields; plain
Kubernetes objects with kubernetes-validate (schemas bundled, no cluster needed).
Then the properties the deployment promises: a CPU-only head, GPU workers, token
authentication on, no token or key in any file, no public dashboard.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
# Kubernetes version whose schemas the plain objects are checked against.
K8S_VERSION = "1.33"
TASKS = {"preprocess", "train", "evaluate", "promote", "sample", "nightly"}
# Environment variables whose value is a credential: only ever from a Secret.
SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
DASHBOARD_PORT = 8265
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML has it: the CRDs load in 2 s, not 20."""


def deployment_files() -> list[Path]:
    return [CLUSTER_YAML, *sorted(p for p in (ROOT / "infra").rglob("*") if p.is_file())]


# --- cluster.yaml ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict[str, Any]:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def docker_options(cluster: dict[str, Any]) -> list[tuple[str, str]]:
    """(flag, value) pairs of docker.run_options, e.g. ("--env", "A=b")."""
    out = []
    for item in cluster["docker"].get("run_options", []):
        words = shlex.split(item)
        for flag, value in zip(words[::2], words[1::2], strict=True):
            out.append((flag, value))
    return out


def docker_env(cluster: dict[str, Any]) -> dict[str, str]:
    pairs = [v.split("=", 1) for f, v in docker_options(cluster) if f in ("--env", "-e")]
    return {k: v for k, v in pairs}


def test_cluster_yaml_validates_against_the_schema_ray_ships(cluster):
    jsonschema.validate(cluster, ray_schema())


def test_ray_schema_rejects_a_broken_cluster_yaml(cluster):
    """The schema check is not vacuous: a misspelled and a mistyped field fail."""
    misspelled = copy.deepcopy(cluster)
    misspelled["head_node_typ"] = misspelled.pop("head_node_type")
    mistyped = copy.deepcopy(cluster)
    mistyped["available_node_types"]["gpu"]["max_workers"] = "8"
    for broken in (misspelled, mistyped):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, ray_schema())


def test_cluster_yaml_passes_rays_own_preparation(cluster):
    """What `ray up` does before it touches AWS: merge defaults, then validate.
    Setup commands stay empty: Ray's AWS defaults would pip-install another Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert prepared[key] == [], f"{key}: everything must come from the image"


def test_head_is_cpu_only_and_gpu_workers_exist(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must schedule nothing (CPU: 0)"
    assert "GPU" not in head["resources"]
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [
        t
        for t in workers.values()
        if t["resources"].get("CPU", 0) >= 1 and not t["resources"].get("GPU")
    ]
    assert gpu, "a GPU node type for training and generation"
    assert cpu, "a CPU node type for preprocessing"
    for t in gpu:
        market = t["node_config"].get("InstanceMarketOptions", {})
        assert market.get("MarketType") == "spot", "GPU workers run on spot instances"


def test_token_auth_is_on_with_the_token_fetched_at_start(cluster):
    env = docker_env(cluster)
    assert env.get("RAY_AUTH_MODE") == "token", "docker run_options: --env RAY_AUTH_MODE=token"
    token_path = env.get("RAY_AUTH_TOKEN_PATH")
    assert token_path, "Ray reads the token from a file (RAY_AUTH_TOKEN_PATH)"
    # The file is mounted from the host, where an initialization command (run on
    # the VM before the container starts) writes it from AWS Secrets Manager.
    mounts = [v.split(":")[:2] for f, v in docker_options(cluster) if f in ("--volume", "-v")]
    host = next(
        (h + token_path[len(c) :] for h, c in mounts if token_path.startswith(c + "/")), None
    )
    assert host, f"{token_path} must be inside a mounted host folder"
    home = f"/home/{cluster['auth']['ssh_user']}"
    targets = {host, host.replace(home, "~", 1)}
    fetches = [
        cmd
        for cmd in cluster["initialization_commands"]
        if "secretsmanager get-secret-value" in cmd and any(f"> {t}" in cmd for t in targets)
    ]
    assert fetches, f"an initialization command must fetch the token into {host}"


def test_no_token_or_key_is_written_in_any_deployment_file():
    for path in deployment_files():
        text = path.read_text()
        assert not AWS_KEY_ID.search(text), f"{path}: an AWS access key id"
        # A token may be referenced by path or from a Secret, never given as a value.
        # (A shell substitution such as RAY_AUTH_TOKEN=$(...) reads it at run time.)
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?[^\s$\"']", text), f"{path}: a token"
        assert not re.search(r"--from-literal=auth_token=[^\s\"$]", text), f"{path}: a token"


def test_no_public_dashboard_port(cluster):
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        all_ports = rule.get("IpProtocol") in ("-1", -1)
        low, high = rule.get("FromPort", 0), rule.get("ToPort", 65535)
        assert not (all_ports or low <= DASHBOARD_PORT <= high), (
            f"security group rule {rule} opens the dashboard; use `ray dashboard cluster.yaml`"
        )
    for cmd in cluster["head_start_ray_commands"]:
        assert "--dashboard-port" not in cmd or f"--dashboard-port={DASHBOARD_PORT}" in cmd


def test_image_carries_the_pinned_ray():
    match = re.search(
        r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-py311", DOCKERFILE.read_text(), re.M
    )
    assert match, "the Dockerfile's base is a rayproject/ray image for Python 3.11"
    pins = (ROOT / "constraints.txt").read_text()
    assert f"\nray=={match.group(1)}\n" in pins, "the image's Ray must be constraints.txt's"
    assert match.group(1) == ray.__version__, "the image's Ray must be the Ray the tests run"


# --- KubeRay manifests ---------------------------------------------------------------


def strict(schema: Any) -> Any:
    """An OpenAPI CRD schema as a JSON schema that rejects what the API server
    would drop or reject: unknown fields (CRD schemas leave additionalProperties
    unset, and the server prunes them silently), int-or-string, nullable."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: strict(v) if k in ("items", "additionalProperties", "not") else v
        for k, v in schema.items()
    }
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]] | None:
    """(apiVersion, kind) -> strict schema, from the CRDs beside the repository;
    None when that folder is missing (the KubeRay checks then skip, saying so)."""
    if not CRDS.is_dir():
        return None
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=FAST_LOADER)  # 3 MB of YAML
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = schema
    assert schemas, f"no CRDs in {CRDS}"
    return schemas


def load_manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(KUBERAY.rglob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for i, doc in enumerate(docs):
            out.append((f"{path.relative_to(KUBERAY)}#{i}", doc))
    return out


MANIFESTS = load_manifests()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc.get("kind") == kind]


def check(doc: dict[str, Any], crd_schemas) -> None:
    """Validate one manifest: a KubeRay resource by its CRD, anything else with
    kubernetes-validate (which fails on kinds it has no schema for)."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind")
    if api_version.startswith("ray.io/"):
        if crd_schemas is None:
            pytest.skip(f"KubeRay CRD schemas not found: {CRDS} (../shared/schemas/kuberay)")
        schema = crd_schemas.get((api_version, kind))
        assert schema is not None, f"KubeRay v1.7.0 has no {kind} in {api_version}"
        jsonschema.Draft7Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_manifest_validates(name, doc, crd_schemas):
    try:
        check(doc, crd_schemas)
    except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
        pytest.fail(f"{name}: {e.message} at {list(e.path)}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{name}: no Kubernetes {K8S_VERSION} schema: {e.message}")


def test_every_kind_is_expected():
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {"RayCluster", "RayJob", "RayCronJob"} <= kinds
    assert "Secret" not in kinds, "ship no Secret: create it with kubectl (infra/README.md)"


HEAD = ("spec", "headGroupSpec")
HEAD_CONTAINER = (*HEAD, "template", "spec", "containers", 0)
# Mistakes in the RayCluster that validation must catch: (where, what is put there).
BREAKAGES = {
    "a misspelled field": ((*HEAD, "rayStartParam"), {"num-cpus": "0"}),
    "an unknown container field": ((*HEAD_CONTAINER, "imagePullPolicyy"), "Always"),
    "a string for an integer": (("spec", "workerGroupSpecs", 0, "minReplicas"), "0"),
    "an integer where Ray wants a string": ((*HEAD, "rayStartParams", "num-cpus"), 0),
    "a value outside the enum": (("spec", "authOptions", "mode"), "tokn"),
    "a malformed quantity": ((*HEAD_CONTAINER, "resources", "limits", "memory"), "16 GB"),
}


@pytest.mark.parametrize("what", BREAKAGES)
def test_validation_rejects_a_broken_raycluster(what, crd_schemas):
    """Not vacuous: the strict CRD schema catches each mistake (the CRD as
    published accepts unknown fields)."""
    (path, value) = BREAKAGES[what]
    (broken,) = copy.deepcopy(of_kind("RayCluster"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        check(broken, crd_schemas)


def test_validation_rejects_a_broken_plain_object(crd_schemas):
    broken = copy.deepcopy(of_kind("ConfigMap")[0])
    broken["dataa"] = broken.pop("data")
    with pytest.raises(kubernetes_validate.ValidationError):
        check(broken, crd_schemas)


def ray_cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Ray cluster the manifests create: the RayCluster and the ones RayJobs
    and RayCronJobs bring with them."""
    for doc in of_kind("RayCluster"):
        yield f"RayCluster {doc['metadata']['name']}", doc["spec"]
    for doc in of_kind("RayJob"):
        if "rayClusterSpec" in doc["spec"]:
            meta = doc["metadata"]
            yield (
                f"RayJob {meta.get('name') or meta['generateName']}",
                doc["spec"]["rayClusterSpec"],
            )
    for doc in of_kind("RayCronJob"):
        if "rayClusterSpec" in doc["spec"]["jobTemplate"]:
            yield (
                f"RayCronJob {doc['metadata']['name']}",
                doc["spec"]["jobTemplate"]["rayClusterSpec"],
            )


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        yield from group["template"]["spec"]["containers"]


def test_ray_clusters_have_cpu_head_gpu_workers_and_token_auth():
    specs = list(ray_cluster_specs())
    assert specs
    for where, spec in specs:
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: CPU-only head"
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: no public dashboard"
        assert not head.get("enableIngress"), f"{where}: no public dashboard"
        assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth"
        assert spec.get("rayVersion") == ray.__version__, (
            f"{where}: rayVersion must be the pinned Ray"
        )
        gpu_groups = [
            g
            for g in spec.get("workerGroupSpecs", [])
            if any(
                int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1
                for c in g["template"]["spec"]["containers"]
            )
        ]
        assert gpu_groups, f"{where}: a worker group with nvidia.com/gpu limits"


def test_credentials_come_only_from_secrets():
    for name, doc in MANIFESTS:
        if doc["kind"] == "ConfigMap":
            for key in doc.get("data", {}):
                assert not SECRET_ENV.search(key), f"{name}: {key} belongs in a Secret"
        for env in find_key(doc, "env"):
            for var in env:
                if SECRET_ENV.search(var["name"]):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in var, (
                        f"{name}: {var['name']} must use secretKeyRef"
                    )
    for where, spec in ray_cluster_specs():
        for c in containers(spec):
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert refs, (
                f"{where}: container {c['name']} gets its credentials via envFrom secretRef"
            )


def find_key(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from find_key(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from find_key(item, key)


# The config class each task parses its arguments into (tasks/<name>.py).
TASK_CONFIGS = {
    "preprocess": "PreprocessConfig",
    "train": "TrainConfig",
    "evaluate": "EvaluateConfig",
    "promote": "PromoteConfig",
    "sample": "SampleConfig",
    "nightly": "NightlyConfig",
}


def jobs() -> Iterator[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(name, job spec, spec of the Ray cluster it runs on) for every RayJob and
    the RayCronJob's template."""
    clusters = {doc["metadata"]["name"]: doc["spec"] for doc in of_kind("RayCluster")}
    for doc in of_kind("RayJob"):
        spec, meta = doc["spec"], doc["metadata"]
        selected = clusters.get(spec.get("clusterSelector", {}).get("ray.io/cluster"))
        yield (
            f"RayJob {meta.get('name') or meta['generateName']}",
            spec,
            spec.get("rayClusterSpec", selected),
        )
    for doc in of_kind("RayCronJob"):
        template = doc["spec"]["jobTemplate"]
        yield f"RayCronJob {doc['metadata']['name']}", template, template.get("rayClusterSpec")


def task_of(entrypoint: str) -> tuple[str, list[str]]:
    """(task name, its arguments) of `python -m tasks.<name> ARGS`."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"] and words[2].startswith("tasks."), (
        f"entrypoint {entrypoint!r} must be `python -m tasks.<name> ...`"
    )
    return words[2].removeprefix("tasks."), words[3:]


def mounted_file(cluster: dict[str, Any], path: str, where: str) -> str:
    """The content of `path` in the head container: a key of a mounted ConfigMap."""
    head = cluster["headGroupSpec"]["template"]["spec"]
    folder, name = str(Path(path).parent), Path(path).name
    mounts = [m for m in head["containers"][0].get("volumeMounts", []) if m["mountPath"] == folder]
    assert mounts, f"{where}: nothing is mounted at {folder} in the head pod"
    (volume,) = [v for v in head.get("volumes", []) if v["name"] == mounts[0]["name"]]
    configmaps = [
        d for d in of_kind("ConfigMap") if d["metadata"]["name"] == volume["configMap"]["name"]
    ]
    assert configmaps and name in configmaps[0]["data"], f"{where}: no ConfigMap key {name}"
    return configmaps[0]["data"][name]


def test_a_rayjob_per_task():
    assert {task_of(doc["spec"]["entrypoint"])[0] for doc in of_kind("RayJob")} == TASKS


def test_every_job_runs_a_task_with_arguments_it_accepts(tmp_path):
    """Each entrypoint parses into its task's config (the file of --config read from
    the ConfigMap mounted in the head pod), on a Ray cluster defined here."""
    import pipeline.config

    for where, job, cluster in jobs():
        assert cluster is not None, f"{where}: must select a RayCluster defined here or bring one"
        task, args = task_of(job["entrypoint"])
        if "--config" in args:
            i = args.index("--config") + 1
            local = tmp_path / f"{task}.yaml"
            local.write_text(mounted_file(cluster, args[i], where))
            args[i] = str(local)
        cls = getattr(pipeline.config, TASK_CONFIGS[task])
        try:
            pipeline.config.parse_args(cls, pipeline.config.make_parser(cls, task, ""), args)
        except (SystemExit, pipeline.config.ConfigError) as e:
            pytest.fail(f"{where}: tasks.{task} rejects its arguments {args}: {e}")


def test_nightly_cronjob_runs_tasks_nightly_on_a_cluster_it_deletes():
    (cron,) = of_kind("RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    job = cron["spec"]["jobTemplate"]
    assert task_of(job["entrypoint"])[0] == "nightly"
    assert job.get("shutdownAfterJobFinishes"), "the nightly cluster is deleted after the run"
