"""The KubeRay manifests are part of the product: each kustomization must render, match the KubeRay and
Kubernetes schemas, run entrypoints that the real job parsers (and, for the sweep, its Tune setup) accept,
agree with the pinned versions, run with KubeRay-managed Ray token auth, and carry no secret values. All
offline: ``kubectl kustomize`` plus schema files."""

from __future__ import annotations

import copy
import importlib.util
import posixpath
import re
import shlex
import shutil
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_render import (
    DATABASE,
    KUSTOMIZATIONS,
    ROOT,
    by_kind,
    cluster_spec,
    config_map,
    dockerfile_args,
    dockerfile_directive,
    image_tag,
    pinned,
    pods,
    python_tag_of_requires_python,
    quantity,
    render,
)

KUBERNETES_VERSION = "1.32"  # kubectl on these machines; kubernetes-validate ships its schemas
RAY_AUTH_SECRET = "ray-auth-token"
# the data key KubeRay reads from the Secret of authOptions.secretName (its RAY_AUTH_TOKEN_SECRET_KEY)
RAY_AUTH_KEY = "auth_token"
SECRETS = {
    "s3-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    RAY_AUTH_SECRET: {RAY_AUTH_KEY},
    "mlflow-credentials": {"username", "password"},  # the Ray pods' MLflow user
    "mlflow-auth": {"admin_password", "flask_secret_key", "basic_auth.ini"},  # the server's auth app
    "mlflow-db": {"backend_store_uri"},
    "postgres-credentials": {"password"},
}
# set by the KubeRay operator from authOptions; a second source in the manifests could disagree with it
OPERATOR_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_K8S_TOKEN_AUTH"}
# RayJob name -> the job script it runs (the two-phase recipe's phases are pretraining runs)
RAYJOBS = {
    "flava-pretrain": "pretrain",
    "flava-tune-mixing": "tune_mixing",
    "flava-phase-text": "pretrain",
    "flava-phase-image": "pretrain",
    "flava-phase-joint": "pretrain",
}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def _structural(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema with the API server's strictness.

    The server rejects unknown fields (kubectl's default strict field validation), so objects that list
    their properties get ``additionalProperties: false`` unless marked to preserve unknown fields;
    ``x-kubernetes-int-or-string`` without an ``anyOf`` becomes one. CEL rules
    (``x-kubernetes-validations``) are not evaluated here.
    """
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        for value in node.values():
            walk(value)
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_validators(shared_dir: Path) -> dict[str, jsonschema.Draft7Validator]:
    validators = {}
    for kind, filename in CRD_FILES.items():
        path = shared_dir / "kuberay-crds" / filename
        if not path.is_file():
            pytest.skip(f"{path} is absent: the KubeRay CRD schemas live in the shared material")
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        assert crd["spec"]["names"]["kind"] == kind, f"{path} defines {crd['spec']['names']['kind']}"
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[kind] = jsonschema.Draft7Validator(_structural(v1["schema"]["openAPIV3Schema"]))
    return validators


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_resources_match_kuberay_crds(name, crd_validators):
    docs = render(name)
    ray_docs = [d for d in docs if d["kind"] in CRD_FILES]
    assert {d["kind"] for d in ray_docs} == set(CRD_FILES), f"{name} lacks a RayJob or RayCluster"
    names = {j["metadata"]["name"] for j in by_kind(docs, "RayJob")}
    assert names == set(RAYJOBS), f"{name}: RayJobs {sorted(names)}, expected {sorted(RAYJOBS)}"
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validators[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name}: {doc['kind']}/{doc['metadata']['name']} breaks the KubeRay CRD:\n" + (
            "\n".join(f"  {'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:20])
        )


def test_crd_check_catches_a_misspelt_field(crd_validators):
    """The strictness matters: the API server would reject (not ignore) this typo."""
    job = copy.deepcopy(by_kind(render("base"), "RayJob")[0])
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e.message for e in crd_validators["RayJob"].iter_errors(job))


@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, DATABASE])
def test_core_resources_match_kubernetes_schemas(name):
    core = [d for d in render(name) if d["kind"] not in CRD_FILES]
    kinds = (
        {"ConfigMap", "StatefulSet", "Service"}
        if name == DATABASE
        else {"ConfigMap", "Deployment", "Service"}
    )
    assert kinds | {"NetworkPolicy"} <= {d["kind"] for d in core}
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(map(str, e.path))
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")


@cache
def _job_module(script: str):
    path = ROOT / "jobs" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_k8s_entrypoint_{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _repo_config_path(docs: tuple[dict, ...], job: dict, mounted: str) -> Path:
    """The jobs/configs file behind a config path on the head: mount -> volume -> ConfigMap key."""
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for mount in head["containers"][0].get("volumeMounts", []):
        relative = posixpath.relpath(mounted, mount["mountPath"])
        if relative.startswith(".."):
            continue
        source = volumes[mount["name"]]["configMap"]
        if "items" in source:
            key = {item["path"]: item["key"] for item in source["items"]}.get(relative)
            assert key, f"{mounted}: ConfigMap {source['name']} projects no item at {relative}"
        else:
            key = relative
        data = config_map(docs, source["name"])["data"]
        assert key in data, f"{mounted}: ConfigMap {source['name']} has no key {key}"
        repo_file = ROOT / "jobs" / "configs" / key
        assert data[key] == repo_file.read_text(), f"ConfigMap {source['name']}/{key} != {repo_file}"
        return repo_file
    raise AssertionError(f"{job['metadata']['name']}: no volume of the head is mounted at {mounted}")


def _resources(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]["resources"]


def _limits(group: dict) -> dict:
    return _resources(group)["limits"]


def gpus(group: dict) -> float:
    return quantity(_limits(group).get("nvidia.com/gpu", 0))


def ray_cpus(group: dict) -> float:
    """The CPUs Ray gets on each pod of a group: KubeRay starts Ray with ``num-cpus`` from rayStartParams,
    else the CPU limit."""
    return quantity(group.get("rayStartParams", {}).get("num-cpus", _limits(group)["cpu"]))


def has_gpus(group: dict) -> bool:
    return "nvidia.com/gpu" in _limits(group)


def train_groups(doc: dict) -> list[dict]:
    """The worker groups Train workers can use: in a cluster with GPUs the groups with GPUs (Train asks for
    one per worker; CPU-only groups serve Ray Data's tasks), else every group."""
    groups = cluster_spec(doc)["workerGroupSpecs"]
    return [g for g in groups if has_gpus(g)] or groups


def ray_resources(job: dict) -> dict[str, float]:
    """What ``ray.cluster_resources()`` reports on the job's cluster: each pod's Ray CPUs and its GPU
    limit."""
    cluster = cluster_spec(job)
    groups = [(cluster["headGroupSpec"], 1)]
    groups += [(g, g["replicas"]) for g in cluster["workerGroupSpecs"]]
    total = {"CPU": 0.0, "GPU": 0.0}
    for group, replicas in groups:
        total["CPU"] += replicas * ray_cpus(group)
        total["GPU"] += replicas * gpus(group)
    return total


def check_sweep(job: dict, config):
    """What ``jobs/tune_mixing.py`` builds from the config before any trial starts: the Tune search space,
    the scheduler, and the trial resources on this job's cluster. (``validate_sweep`` would also read every
    swept dataset's manifest from S3, which is not reachable offline.) Returns the trial resources."""
    from pipeline.config import ConfigError
    from pipeline.tune.resources import derive_resources
    from pipeline.tune.space import num_trials, param_space
    from pipeline.tune.sweep import _scheduler

    try:
        param_space(config)
        _scheduler(config)
        return derive_resources(ray_resources(job), config, num_trials(config))
    except ConfigError as e:
        raise AssertionError(f"{job['metadata']['name']}: jobs/tune_mixing.py rejects the sweep: {e}") from e


def parse_entrypoint(docs: tuple[dict, ...], job: dict):
    """Runs the entrypoint's command line through the real parser of the job it names (and, for the sweep,
    through the construction of its search space, scheduler and trial resources)."""
    argv = shlex.split(job["spec"]["entrypoint"])
    app_dir = dockerfile_directive("WORKDIR")[-1]
    assert argv[0] == "python", f"entrypoint should start with python: {argv}"
    match = re.fullmatch(rf"{re.escape(app_dir)}/jobs/(\w+)\.py", argv[1])
    assert match, f"entrypoint script {argv[1]} is not a job of the image's {app_dir}/jobs/"
    args = argv[2:]
    assert "--config" in args, f"{job['metadata']['name']}: entrypoint passes no --config"
    at = args.index("--config") + 1
    args[at] = str(_repo_config_path(docs, job, args[at]))
    try:
        config, namespace = _job_module(match[1]).parse(args)
    except SystemExit as e:
        raise AssertionError(f"jobs/{match[1]}.py rejects the entrypoint {argv} (exit {e.code})") from e
    if match[1] == "tune_mixing":
        check_sweep(job, config)
    return match[1], config


def _train_slots(job: dict) -> int:
    """Train workers the job's train groups can hold: one per GPU, or one per pod on CPU."""
    return sum(g["replicas"] * max(1, int(gpus(g))) for g in train_groups(job))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_entrypoints_parse_and_fit_their_cluster(name, tmp_path, monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.paths import SWEEP, absolute_paths

    # a relative path would land in a pod's (or a submitted job's package) directory that goes with it
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_k8s"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    docs = render(name)
    storage = config_map(docs, "flava-storage")["data"]
    services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    configs = {}
    for job in by_kind(docs, "RayJob"):
        script, config = parse_entrypoint(docs, job)
        assert script == RAYJOBS[job["metadata"]["name"]], f"{name}: {job['metadata']['name']} runs {script}"
        configs[job["metadata"]["name"]] = (job, config)
        where = f"{name}: RayJob/{job['metadata']['name']}"
        train = config.train
        assert train.warmup_steps < train.steps, (
            f"{where}: warmup {train.warmup_steps} >= {train.steps} steps"
        )
        assert 0 < train.val_every <= train.steps and 0 < train.checkpoint_every <= train.steps, where
        gpus = any(has_gpus(g) for g in cluster_spec(job)["workerGroupSpecs"])
        assert config.train.use_gpu == gpus, f"{where}: train.use_gpu={config.train.use_gpu}, GPUs: {gpus}"
        slots = _train_slots(job)
        if script == "pretrain":
            assert config.train.num_workers == slots, f"{where}: num_workers != {slots} worker slots"
            assert_elastic_range(where, job, config)
        else:
            per_trial = config.tune.workers_per_trial or config.train.num_workers
            assert per_trial <= slots, f"{where}: a trial needs {per_trial} of {slots} worker slots"
        for group in train_groups(job):
            assert config.train.cpus_per_worker < ray_cpus(group), f"{where}: no CPU left for Ray Data tasks"
        assert config.storage.s3_endpoint_url == storage.get("s3_endpoint_url", ""), (
            f"{where}: storage.s3_endpoint_url disagrees with the flava-storage ConfigMap"
        )
        assert config.storage.s3_region == storage["s3_region"]
        uris = [
            config.train.storage_path,
            config.tune.storage_path,
            *config.data.train.values(),
            *config.data.val.values(),
        ]
        assert all(u.startswith("s3://") for u in uris), f"{where}: pods have no local storage: {uris}"
        try:
            absolute_paths(config, SWEEP)
        except ConfigError as e:
            raise AssertionError(f"{where}: {e}") from e
        tracking = re.fullmatch(r"http://([a-z0-9-]+)(\.[a-z0-9.-]+)?:5000", config.mlflow.tracking_uri)
        assert tracking and tracking[1] in services, f"{where}: {config.mlflow.tracking_uri} is no Service"
    assert set(configs) == set(RAYJOBS)
    assert_sweep_is_short(name, *configs["flava-tune-mixing"], configs["flava-pretrain"][1])
    assert_phases_chain(name, {job: config for job, (_, config) in configs.items()})


def assert_phases_chain(name: str, configs: dict) -> None:
    """The joint phase initialises its encoders from the two phases' runs, with the text phase's vocabulary,
    on the storage they write to; every phase waits suspended for the previous one (infra/README.md)."""
    text, image, joint = (configs[f"flava-phase-{p}"] for p in ("text", "image", "joint"))
    assert (text.model.phase, image.model.phase, joint.model.phase) == ("text", "image", "joint"), name
    assert joint.model.init_encoders == {
        "text": f"run:{text.train.run_name}",
        "image": f"run:{image.train.run_name}",
    }, f"{name}: the joint phase does not start from the phases' runs"
    assert text.train.storage_path == image.train.storage_path == joint.train.storage_path, name
    tokenizer = text.data.tokenizer or f"{text.train.storage_path}/{text.train.run_name}/tokenizer"
    assert image.data.tokenizer == joint.data.tokenizer == tokenizer, (
        f"{name}: the phases' vocabularies differ"
    )


def assert_elastic_range(where: str, job: dict, config) -> None:
    """The train group's replica range is the run's worker range (one Train worker per pod), and a
    range that can shrink is kept by KubeRay's autoscaler (it replaces preempted pods)."""
    (group,) = train_groups(job)
    fewest, most = config.train.worker_range
    replicas = (group["minReplicas"], group["replicas"], group["maxReplicas"])
    assert replicas == (fewest, most, most), (
        f"{where}: replicas (min, start, max) {replicas} != {fewest, most}"
    )
    if fewest < most:
        assert cluster_spec(job).get("enableInTreeAutoscaling"), f"{where}: elastic without autoscaling"
    assert job["spec"].get("backoffLimit", 0) >= 1, f"{where}: a failed job is never retried"
    assert job["spec"].get("activeDeadlineSeconds", 0) > 0, f"{where}: no deadline"


def assert_sweep_is_short(name: str, tune_job: dict, sweep, pretrain) -> None:
    """Trials are short runs: the whole sweep, even with no trial stopped early, costs at most one
    pretraining run in worker-steps (same preset, so the same batch per worker). A trial that inherited the
    pretraining schedule (train.steps) would cost num_trials pretraining runs."""
    from pipeline.tune.space import num_trials

    resources = check_sweep(tune_job, sweep)
    trials = num_trials(sweep)
    sweep_cost = trials * sweep.train.steps * resources.workers_per_trial
    pretrain_cost = pretrain.train.steps * pretrain.train.num_workers
    assert sweep_cost <= pretrain_cost, (
        f"{name}: {trials} trials x {sweep.train.steps} steps x {resources.workers_per_trial} worker(s) = "
        f"{sweep_cost} worker-steps > pretraining's {pretrain_cost}: override train.steps for the sweep"
    )


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_interactive_cluster_mounts_the_jobs_preset(name):
    """So that an interactive ``ray job submit`` with the mounted preset (README) runs as a RayJob does."""

    def config_mount(doc):
        head = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v.get("configMap") for v in head.get("volumes", [])}
        return [(m["mountPath"], volumes[m["name"]]) for m in head["containers"][0].get("volumeMounts", [])]

    docs = render(name)
    (interactive,) = by_kind(docs, "RayCluster")
    for job in by_kind(docs, "RayJob"):
        assert config_mount(job) == config_mount(interactive), f"{name}: {job['metadata']['name']}"


def test_entrypoint_check_catches_a_renamed_key():
    docs = render("base")
    job = copy.deepcopy(by_kind(docs, "RayJob")[0])
    job["spec"]["entrypoint"] += " train.num_worker=3"
    with pytest.raises(AssertionError, match="rejects the entrypoint"):
        parse_entrypoint(docs, job)


def _job(docs: tuple[dict, ...], script: str) -> dict:
    """The RayJob of ``pretrain`` (not a phase) or ``tune_mixing``."""
    name = {"pretrain": "flava-pretrain", "tune_mixing": "flava-tune-mixing"}[script]
    (job,) = [j for j in by_kind(docs, "RayJob") if j["metadata"]["name"] == name]
    return copy.deepcopy(job)


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.scheduler=hyperband", "rejects the entrypoint"),  # not one of asha | none: the parser says so
        ("tune.grace_period=50", "exceeds train.steps"),  # ASHA could never stop a trial
        ("tune.search=bayes", "rejects the entrypoint"),
        ("tune.sources=[audio, audio]", "rejects the entrypoint"),
        ("tune.workers_per_trial=4", "does not fit the Ray cluster"),  # 4 worker CPUs, 1 kept for data
    ],
)
def test_entrypoint_check_catches_a_bad_sweep(override, message):
    docs = render("base")
    job = _job(docs, "tune_mixing")
    job["spec"]["entrypoint"] += f" {override}"
    with pytest.raises(AssertionError, match=message):
        parse_entrypoint(docs, job)


def test_sweep_length_check_catches_inherited_pretraining_steps():
    """Without the gpu overlay's trial-length overrides, each of the 16 trials would run 100k steps."""
    docs = render("overlays/gpu")
    job = _job(docs, "tune_mixing")
    base = _job(render("base"), "tune_mixing")["spec"]["entrypoint"]
    assert job["spec"]["entrypoint"].startswith(base + " "), "the gpu sweep should only append overrides"
    job["spec"]["entrypoint"] = base
    _, sweep = parse_entrypoint(docs, job)
    _, pretrain = parse_entrypoint(docs, _job(docs, "pretrain"))
    assert pretrain.train.steps == 100_000 and sweep.train.steps == pretrain.train.steps
    with pytest.raises(AssertionError, match="override train.steps for the sweep"):
        assert_sweep_is_short("overlays/gpu", job, sweep, pretrain)


def test_versions_agree():
    ray_version, python_tag = pinned("ray"), python_tag_of_requires_python()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == ray_version, "Dockerfile RAY_VERSION differs from pyproject's ray pin"
    assert args["PYTHON_TAG"] == python_tag, "Dockerfile PYTHON_TAG differs from requires-python"
    assert dockerfile_directive("FROM") == ["rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_PLATFORM}"]
    assert args["RAY_PLATFORM"] == "gpu" and "/whl/cu" in args["TORCH_INDEX_URL"], "default build is GPU"
    assert pinned("torch"), "the Dockerfile installs pyproject's torch pin from TORCH_INDEX_URL"
    for name in KUSTOMIZATIONS:
        docs = render(name)
        for doc in docs:
            spec = cluster_spec(doc)
            if spec is not None:
                assert spec["rayVersion"] == ray_version, f"{name}: {doc['metadata']['name']} rayVersion"
            for pod in pods(doc):
                limits = [c["resources"].get("limits", {}) for c in pod.spec["containers"]]
                gpu = any("nvidia.com/gpu" in lim for lim in limits)
                for container in pod.spec["containers"]:
                    if name == "base":  # the overlays pin the image (test_images_are_pinned_by_commit)
                        assert container["image"] == "flava-ray", f"base: {pod.where}: {container['image']}"
                        continue
                    tag = image_tag(name)
                    match = re.fullmatch(r"[\w.]+-g[0-9a-f]{12,40}-ray([\d.]+)-(py\d+)-(cpu|gpu)", tag)
                    assert match, f"{name}: {pod.where}: image tag {tag} does not name Ray/Python/platform"
                    assert match[1] == ray_version and match[2] == python_tag, f"{name}: {pod.where}: {tag}"
                    assert not gpu or match[3] == "gpu", f"{name}: {pod.where} requests GPUs on a {tag} image"


def test_dockerfile_runs_as_non_root_with_the_code_baked_in():
    users = dockerfile_directive("USER")
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "last USER must be a numeric non-root id"
    assert any(line.startswith("--chown=") and line.endswith(" . .") for line in dockerfile_directive("COPY"))
    assert any("pip install --no-deps ." in run for run in dockerfile_directive("RUN"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "mlruns", "runs", "**/*.db"} <= set(ignored)


def secret_refs(pod) -> list[tuple[str, str, str]]:
    """(where, Secret, key) of every Secret a pod reads: env entries and volumes."""
    refs = []
    for container in pod.spec["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((f"{pod.where} env {env['name']}", ref["name"], ref["key"]))
    for volume in pod.spec.get("volumes", []):
        if "secret" in volume:
            name = volume["secret"]["secretName"]
            refs += [
                (f"{pod.where} volume {volume['name']}", name, i["key"]) for i in volume["secret"]["items"]
            ]
    return refs


@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, DATABASE])
def test_no_secret_values_and_only_known_secret_refs(name):
    docs = render(name)
    assert not by_kind(docs, "Secret"), f"{name} renders a Secret: secrets are created out of band"
    text = yaml.safe_dump_all(docs)
    patterns = (
        r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
        r"-----BEGIN [A-Z ]*PRIVATE KEY",
        r"(secret_access_key|auth_token|password)\s*[:=]\s*\S",  # a credential assigned a value
        r"://[^/\s]+@",  # a URI with credentials
    )
    for pattern in patterns:
        assert not re.search(pattern, text, flags=re.I), f"{name}: rendered manifests match {pattern}"
    readme = (ROOT / "infra" / "README.md").read_text()
    assert "--from-literal=" not in readme, (
        "README creates a Secret from the command line (process list, history)"
    )
    for doc in docs:
        auth_secret = (cluster_spec(doc) or {}).get("authOptions", {}).get("secretName")
        if auth_secret:
            assert auth_secret in SECRETS, f"{name}: {doc['metadata']['name']}: unknown Secret {auth_secret}"
            create = rf"secret generic {auth_secret}\s*\\?\s*--from-file={RAY_AUTH_KEY}="
            assert re.search(create, readme), f"README does not create {auth_secret} with key {RAY_AUTH_KEY}"
        for pod in pods(doc):
            for container in pod.spec["containers"]:
                for env in container.get("env", []):
                    if re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|_URI$", env["name"]) and not re.search(
                        r"_(FILE|PATH)$", env["name"]
                    ):  # a path to a mounted Secret is no value
                        assert "value" not in env, (
                            f"{name}: {pod.where} env {env['name']} holds a literal value"
                        )
            for where, secret, key in secret_refs(pod):
                assert key in SECRETS.get(secret, ()), f"{name}: {where}: unknown Secret key {secret}/{key}"
                create = rf"secret generic {secret}\b[^`]*--from-file={re.escape(key)}="
                assert re.search(create, readme), (
                    f"README does not create {secret} with key {key} from a file"
                )


def auth_problems(doc: dict) -> list[str]:
    """Why a RayJob or RayCluster would not run with KubeRay-managed Ray token auth ([] if it would).

    With ``authOptions`` KubeRay (>= 1.6 for ``secretName``) injects RAY_AUTH_MODE/RAY_AUTH_TOKEN into the
    Ray containers, their wait-gcs-ready init containers and the RayJob submitter, and its own dashboard
    client sends the token when it polls the job (GetJobInfo); without it the operator's requests are
    rejected, so a RayJob never sees its job finish, shut down or reach its TTL.
    """
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    auth = cluster_spec(doc).get("authOptions") or {}
    problems = []
    if auth.get("mode") != "token":
        problems.append(f"{where}: authOptions.mode is {auth.get('mode')!r}, not 'token'")
    if auth.get("secretName") != RAY_AUTH_SECRET:
        problems.append(
            f"{where}: authOptions.secretName is {auth.get('secretName')!r}, not {RAY_AUTH_SECRET}"
        )
    if auth.get("enableK8sTokenAuth"):
        problems.append(
            f"{where}: enableK8sTokenAuth is unsupported for RayJobs and not what the README sets up"
        )
    if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append(f"{where}: the submitter pod template (and its token injection) is K8sJobMode only")
    for pod in pods(doc):
        for c in pod.spec["containers"] + pod.spec.get("initContainers", []):
            for env in OPERATOR_AUTH_ENV & {e["name"] for e in c.get("env", [])}:
                problems.append(
                    f"{pod.where} container {c['name']} sets {env}: KubeRay sets it from authOptions"
                )
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_clusters_use_kuberay_token_auth(name):
    docs = [d for d in render(name) if cluster_spec(d) is not None]
    assert len(docs) == len(RAYJOBS) + 1, f"{name}: expected the RayJobs and the interactive RayCluster"
    problems = [p for doc in docs for p in auth_problems(doc)]
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_auth_check_catches_missing_auth_options_and_a_second_token_source():
    job = copy.deepcopy(by_kind(render("base"), "RayJob")[0])
    assert not auth_problems(job)
    job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] = "ray-auth"
    assert any("secretName" in p for p in auth_problems(job))
    del job["spec"]["rayClusterSpec"]["authOptions"]
    assert any("authOptions.mode" in p for p in auth_problems(job))
    (cluster,) = copy.deepcopy(by_kind(render("base"), "RayCluster"))
    token = {
        "name": "RAY_AUTH_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": RAY_AUTH_SECRET, "key": RAY_AUTH_KEY}},
    }
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(token)
    assert any("sets RAY_AUTH_TOKEN" in p for p in auth_problems(cluster))


def autoscaled(doc: dict) -> bool:
    return bool((cluster_spec(doc) or {}).get("enableInTreeAutoscaling"))


@pytest.mark.parametrize("name", [*KUSTOMIZATIONS, DATABASE])
def test_pods_are_hardened_and_sized(name):
    for doc in render(name):
        if doc["kind"] == "RayJob":
            assert doc["spec"]["shutdownAfterJobFinishes"] is True
            assert doc["spec"]["ttlSecondsAfterFinished"] > 0
        for pod in pods(doc):
            assert pod.spec["securityContext"]["runAsNonRoot"] is True, f"{name}: {pod.where}"
            assert pod.spec["securityContext"]["runAsUser"] > 0, f"{name}: {pod.where}"
            # only the autoscaler beside an autoscaled cluster's head calls the Kubernetes API
            needs_token = pod.role == "head" and autoscaled(doc)
            assert pod.spec.get("automountServiceAccountToken") is needs_token, f"{name}: {pod.where}"
            for c in pod.spec["containers"]:
                where = f"{name}: {pod.where} container {c['name']}"
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
                assert "ALL" in c["securityContext"]["capabilities"]["drop"], where
                if pod.role in ("server", "database"):  # Ray pods: rayjob/rayjob.yaml says why not
                    assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
                    mounts = {m["mountPath"] for m in c["volumeMounts"]}
                    assert "/tmp" in mounts, f"{where}: read-only root without a writable /tmp"
                assert {"cpu", "memory", "ephemeral-storage"} <= set(c["resources"]["requests"]), where
                assert {"cpu", "memory", "ephemeral-storage"} <= set(c["resources"]["limits"]), where
                for resource, amount in c["resources"]["requests"].items():
                    ceiling = c["resources"]["limits"].get(resource, amount)
                    assert quantity(amount) <= quantity(ceiling), f"{where}: {resource}"


def shm_problems(doc: dict) -> list[str]:
    """Why a Ray pod's object store would not be in a memory-backed /dev/shm that its limit covers."""
    problems = []
    cluster = cluster_spec(doc)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod, group in zip([p for p in pods(doc) if p.role in ("head", "worker")], groups, strict=True):
        (container,) = pod.spec["containers"]
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        shm = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        source = volumes.get(shm[0]["name"], {}).get("emptyDir", {}) if shm else {}
        if source.get("medium") != "Memory" or "sizeLimit" not in source:
            problems.append(f"{pod.where}: no memory-backed emptyDir with a sizeLimit at /dev/shm")
            continue
        size, limit = quantity(source["sizeLimit"]), quantity(container["resources"]["limits"]["memory"])
        store = quantity(group["rayStartParams"].get("object-store-memory", 0.3 * limit))  # Ray: 30%
        if store > size:
            problems.append(f"{pod.where}: object store {store:.0f} B > /dev/shm {size:.0f} B")
        if size > limit / 2:
            problems.append(f"{pod.where}: /dev/shm takes more than half the memory limit")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_pods_keep_the_object_store_in_shared_memory(name):
    problems = [p for doc in render(name) if cluster_spec(doc) is not None for p in shm_problems(doc)]
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_shm_check_catches_a_missing_volume_and_an_oversized_store():
    job = copy.deepcopy(by_kind(render("base"), "RayJob")[0])
    assert not shm_problems(job)
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["rayStartParams"]["object-store-memory"] = str(2 * 2**30)
    assert any("object store" in p for p in shm_problems(job))
    del worker["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any("no memory-backed emptyDir" in p for p in shm_problems(job))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_config_map_references_resolve(name):
    docs = render(name)
    for doc in docs:
        for pod in pods(doc):
            for volume in pod.spec.get("volumes", []):
                if "configMap" in volume:
                    data = config_map(docs, volume["configMap"]["name"])["data"]
                    for item in volume["configMap"].get("items", []):
                        assert item["key"] in data, f"{name}: {pod.where}: no key {item['key']}"
            for container in pod.spec["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and not ref.get("optional"):
                        assert ref["key"] in config_map(docs, ref["name"])["data"], f"{name}: {pod.where}"


def _tolerates_gpus(spec: dict) -> bool:
    return any(
        t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec.get("tolerations", [])
    )


def _hardening(group: dict) -> dict:
    """What a worker pod shares with its cluster's other groups whatever its size: security, identity,
    labels (the NetworkPolicies select on them), credentials and volume mounts."""
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    return {
        "labels": group["template"]["metadata"]["labels"],
        "pod": {k: spec.get(k) for k in ("securityContext", "automountServiceAccountToken")},
        "container": {k: container.get(k) for k in ("image", "securityContext", "env", "volumeMounts")},
        "volumes": [{k: v for k, v in vol.items() if k != "emptyDir"} for vol in spec.get("volumes", [])],
    }


def test_gpu_workers_request_and_tolerate_gpus():
    """Train workers get GPUs; beside them a CPU-only group, hardened like them, adds CPUs for Ray Data's
    preprocessing (the layout infra/README.md tells users to copy)."""
    clusters = [d for d in render("overlays/gpu") if cluster_spec(d) is not None]
    assert len(clusters) == len(RAYJOBS) + 1
    for doc in clusters:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        groups = cluster_spec(doc)["workerGroupSpecs"]
        gpu = [g for g in groups if has_gpus(g)]
        assert gpu and train_groups(doc) == gpu, where
        for group in gpu:
            resources = _resources(group)
            assert quantity(resources["limits"]["nvidia.com/gpu"]) >= 1, where
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where
            assert _tolerates_gpus(group["template"]["spec"]), where
        cpu_only = [g for g in groups if not has_gpus(g)]
        assert cpu_only, f"{where}: no CPU-only worker group for Ray Data's preprocessing"
        for group in cpu_only:
            here = f"{where} worker group {group['groupName']}"
            resources = _resources(group)
            assert "nvidia.com/gpu" not in resources["requests"] | resources["limits"], here
            assert not _tolerates_gpus(group["template"]["spec"]), f"{here} would take a GPU node"
            assert ray_cpus(group) > 0, f"{here} gives Ray Data no CPUs"
            assert _hardening(group) == _hardening(gpu[0]), (
                f"{here} is not hardened like {gpu[0]['groupName']}"
            )
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], here
            if doc["kind"] == "RayJob":  # the autoscaler grows it as Ray Data asks for CPUs
                assert autoscaled(doc) and group["replicas"] < group["maxReplicas"], here


def test_cpu_smoke_fits_a_laptop():
    """Everything that starts at once (suspended RayJobs wait) requests at most 4 CPUs and 8 GiB."""
    cpu = memory = 0.0
    for doc in render("overlays/cpu-smoke"):
        if doc["kind"] == "RayJob" and doc["spec"].get("suspend"):
            continue
        for pod in pods(doc):
            for c in pod.spec["containers"]:
                assert "nvidia.com/gpu" not in c["resources"]["limits"], pod.where
                cpu += pod.replicas * quantity(c["resources"]["requests"]["cpu"])
                memory += pod.replicas * quantity(c["resources"]["requests"]["memory"])
    assert cpu <= 4 and memory <= 8 * 2**30, f"cpu-smoke requests {cpu} CPUs and {memory / 2**30:.1f} GiB"


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector matches ``labels`` (``{}`` matches every pod)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value, present = labels.get(e["key"]), e["key"] in labels
        if not {
            "Exists": present,
            "DoesNotExist": not present,
            "In": present and value in e.get("values", []),
            "NotIn": value not in e.get("values", []),
        }[e["operator"]]:
            return False
    return True


def allowed(policies: list[dict], direction: str, pod: dict, peer: dict, port: int) -> bool:
    """Whether NetworkPolicies let traffic of ``direction`` (Ingress or Egress) between the pod labelled
    ``pod`` and a pod of the same namespace labelled ``peer`` on a TCP ``port``. A pod no policy of that
    direction selects is open; one that is selected gets only what some rule allows."""
    mine = [
        p
        for p in policies
        if direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod)
    ]
    if not mine:
        return True
    field, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in mine:
        for rule in policy["spec"].get(field) or []:
            ports = [p["port"] for p in rule.get("ports") or [] if p.get("protocol", "TCP") == "TCP"]
            if rule.get("ports") and port not in ports:
                continue
            targets = rule.get(peers)
            if targets is None:  # any peer
                return True
            for target in targets:
                if "namespaceSelector" in target or "ipBlock" in target:
                    continue  # other namespaces, addresses: not a pod of this namespace
                if selects(target.get("podSelector", {}), peer):
                    return True
    return False


def connects(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    return allowed(policies, "Egress", source, target, port) and allowed(
        policies, "Ingress", target, source, port
    )


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policies_deny_by_default_and_allow_what_each_pod_needs(name):
    docs = render(name)
    policies = by_kind(docs, "NetworkPolicy") + by_kind(render(DATABASE), "NetworkPolicy")
    assert any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ), f"{name}: no default-deny NetworkPolicy"
    all_pods = [pod for doc in docs for pod in pods(doc)]
    for pod in all_pods:
        specific = [
            p for p in policies if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], pod.labels)
        ]
        assert specific, f"{name}: no NetworkPolicy selects {pod.where} (labels {pod.labels})"
    ray = [p for p in all_pods if p.role in ("head", "worker", "submitter")]
    (mlflow,) = [p for p in all_pods if p.role == "server"]
    postgres = {"app.kubernetes.io/name": "postgres"}
    for a in ray:
        assert connects(policies, a.labels, mlflow.labels, 5000), f"{name}: {a.where} cannot reach MLflow"
        for b in ray:
            same = a.labels["flava-ray/cluster"] == b.labels["flava-ray/cluster"]
            for port in (6379, 8265, 10001):  # each side on its own: egress and ingress both guard
                sides = (allowed(policies, "Egress", a.labels, b.labels, port),
                         allowed(policies, "Ingress", b.labels, a.labels, port))  # fmt: skip
                assert sides == (same, same), (
                    f"{name}: {a.where} -> {b.where}:{port} (egress, ingress) {sides}"
                )
        assert not connects(policies, a.labels, postgres, 5432), f"{name}: {a.where} reaches the database"
        assert not allowed(policies, "Ingress", a.labels, mlflow.labels, 8265), (
            f"{name}: MLflow reaches {a.where}"
        )
    assert connects(policies, mlflow.labels, postgres, 5432), f"{name}: MLflow cannot reach its database"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_only_the_operator_reaches_a_head_from_outside_and_no_client_port(name):
    docs = render(name)
    for policy in by_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress") or []:
            outside = [t for t in rule.get("from") or [] if "namespaceSelector" in t or "ipBlock" in t]
            if outside:
                assert policy["metadata"]["name"] == "ray-dashboard-from-operator", policy["metadata"]["name"]
                assert [p["port"] for p in rule["ports"]] == [8265]
                assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
            assert 10001 not in [p.get("port") for p in rule.get("ports") or []]
    for doc in docs:
        for pod in pods(doc):
            ports = [p["containerPort"] for c in pod.spec["containers"] for p in c.get("ports", [])]
            assert 10001 not in ports, f"{name}: {pod.where} exposes the Ray client port"


def test_policy_check_catches_an_open_cluster():
    """The isolation oracle: without the per-cluster selector, two job clusters would reach each other."""
    docs = render("base")
    policies = copy.deepcopy(by_kind(docs, "NetworkPolicy"))
    heads = [p for doc in docs for p in pods(doc) if p.role == "head"]
    a, b = heads[0].labels, heads[1].labels
    assert not connects(policies, a, b, 6379)
    for policy in policies:
        if policy["metadata"]["name"].startswith("ray-cluster-"):
            policy["spec"]["ingress"][0]["from"][0]["podSelector"] = {}
            policy["spec"]["egress"][0]["to"][0]["podSelector"] = {}
    assert connects(policies, a, b, 6379)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_mlflow_requires_auth_and_names_its_hosts(name):
    (server,) = by_kind(render(name), "Deployment")
    (container,) = server["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    assert args["--app-name"] == "basic-auth", f"{name}: MLflow without its basic-auth app"
    hosts = args["--allowed-hosts"].split(",")
    assert not [h for h in hosts if "*" in h], f"{name}: wildcard in --allowed-hosts: {hosts}"
    assert {"mlflow:5000", "localhost:5000"} <= set(hosts), f"{name}: {hosts}"
    assert "--backend-store-uri" not in " ".join(container["args"]), "the store URI holds a password"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    for pod in (p for doc in render(name) for p in pods(doc) if p.role in ("head", "worker")):
        names = {e["name"] for e in pod.spec["containers"][0]["env"]}
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names, f"{name}: {pod.where}"


def test_the_database_lives_apart_and_keeps_its_volume():
    database = render(DATABASE)
    (statefulset,) = by_kind(database, "StatefulSet")
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert not by_kind(database, "PersistentVolumeClaim"), "a listed claim would go with `delete -k`"
    for name in KUSTOMIZATIONS:
        kinds = {d["kind"] for d in render(name)}
        assert not kinds & {"PersistentVolumeClaim", "StatefulSet", "PersistentVolume"}, f"{name}: {kinds}"
    assert statefulset["metadata"]["namespace"] == render("overlays/gpu")[0]["metadata"]["namespace"]


def test_images_are_pinned_by_commit(tmp_path):
    """The overlays name the image of a commit of this repository (infra/docker/pin_image.py writes it);
    pin_image.py itself rewrites the one images: entry, by tag or by digest."""
    import subprocess

    pin_image = _load(ROOT / "infra" / "docker" / "pin_image.py")
    for name in KUSTOMIZATIONS[1:]:
        commit = re.search(r"-g([0-9a-f]{12,40})-", image_tag(name))
        assert commit, f"{name}: image tag {image_tag(name)} names no commit"
        if (ROOT / ".git").exists():
            known = subprocess.run(
                ["git", "cat-file", "-e", f"{commit[1]}^{{commit}}"], cwd=ROOT, check=False
            )
            assert known.returncode == 0, f"{name}: {commit[1]} is no commit of this repository"
    copy_root = tmp_path / "repo"
    shutil.copytree(ROOT / "infra" / "k8s", copy_root / "infra" / "k8s")
    shutil.copytree(ROOT / "jobs" / "configs", copy_root / "jobs" / "configs")
    overlay = copy_root / "infra" / "k8s" / "overlays" / "gpu"
    digest = "sha256:" + "ab" * 32
    tag = "0.1.0-g" + "1" * 12 + "-ray2.60.0-py311-gpu"
    pin_image.pin(overlay / "kustomization.yaml", "registry.example/flava-ray", tag, digest)
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    )
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    images = {c["image"] for doc in docs for pod in pods(doc) for c in pod.spec["containers"]}
    assert images == {f"registry.example/flava-ray:{tag}@{digest}"}, images  # the digest decides


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_sweep_and_the_phases_wait_for_pretraining(name):
    waiting = [n for n in RAYJOBS if n != "flava-pretrain"]
    for job in by_kind(render(name), "RayJob"):
        if job["metadata"]["name"] in waiting:
            assert job["spec"].get("suspend") is True, f"{name}: {job['metadata']['name']} starts at once"


def test_ignore_files_keep_credentials_out_of_uploads_and_images():
    for ignore in (".rayignore", ".dockerignore"):
        patterns = {line.strip().removeprefix("**/") for line in (ROOT / ignore).read_text().splitlines()}
        missing = {".env", "*.pem", "*.key", "*credentials*"} - patterns
        assert not missing, f"{ignore} does not exclude {missing}"


def test_the_deletion_rules_component_deletes_workers_first(tmp_path, crd_validators):
    """infra/k8s/components/deletion-rules on cpu-smoke: valid RayJobs (KubeRay's CRD) that delete the
    workers when the job ends, whatever its status, and the head later; no TTL beside the rules."""
    import os
    import subprocess

    here = os.path.relpath(ROOT / "infra" / "k8s", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{here}/overlays/cpu-smoke]\ncomponents: [{here}/components/deletion-rules]\n"
    )
    done = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    jobs = [d for d in yaml.safe_load_all(done.stdout) if d and d["kind"] == "RayJob"]
    assert len(jobs) == len(RAYJOBS)
    for job in jobs:
        errors = list(crd_validators["RayJob"].iter_errors(job))
        assert not errors, [e.message[:200] for e in errors]
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec
        rules = {(r["condition"]["jobStatus"], r["policy"]): r["condition"]["ttlSeconds"] for r in
                 spec["deletionStrategy"]["deletionRules"]}  # fmt: skip
        for status in ("SUCCEEDED", "FAILED"):
            assert rules[(status, "DeleteWorkers")] == 0 < rules[(status, "DeleteCluster")], rules
        assert not spec["rayClusterSpec"].get("enableInTreeAutoscaling"), "KubeRay: no DeleteWorkers then"
