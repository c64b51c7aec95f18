"""The deployment files: KubeRay manifests, the `ray up` cluster file, the Dockerfile, the README.

Each manifest is checked against the fields its kind expects; the AWS cluster file goes through
Ray's own cluster-config validation (no AWS call); every `python -m` command of the manifests and
of deploy/README.md is parsed by the stage's real command-line parser, its config resolved, and
its GPU demand compared with the cluster it is sent to. Docker cannot run here: the Dockerfile
is checked as text.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENCODERS = ["vits14", "vitb14", "vitl14", "clip_vitb16", "mae_vitb16"]
STAGE_MODULES = {"labeling": "labeling.run", "training": "training.run",
                 "evaluation": "evaluation.run"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# field names of the KubeRay ray.io/v1 API (RayCluster and RayJob specs)
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend",
                   "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts",
                "rayStartParams", "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
               "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
               "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
               "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
               "shutdownAfterJobFinishes", "suspend"}
# (vCPUs, GPUs) of the EC2 instance types the cluster file uses
EC2_TYPES = {"m5.4xlarge": (16, 0), "g5.2xlarge": (8, 1), "p4d.24xlarge": (96, 8)}
SECRET_PATTERNS = [r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret", r"(?i)aws_access_key",
                   r"(?i)aws_session_token", r"(?i)aws_credentials", r"(?i)hf_token",
                   r"(?i)hugging_face_hub_token", r"-----BEGIN [A-Z ]*PRIVATE KEY"]


def quantity(q: str | int | float) -> float:
    """A Kubernetes quantity (``8``, ``500m``, ``48Gi``, ``6G``) as a plain number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert match and match.group(2) in {"", *units}, f"bad quantity {q!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text()))
            for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, d) for name, docs in k8s_docs().items() for d in docs if d["kind"] == kind]


def the_raycluster() -> dict:
    clusters = of_kind("RayCluster")
    assert len(clusters) == 1, f"expected one RayCluster in deploy/k8s, found {len(clusters)}"
    return clusters[0][1]


def pods(cluster: dict):
    """(group name, rayStartParams, pod spec) of the head group and every worker group."""
    head = cluster["spec"]["headGroupSpec"]
    yield "head", head["rayStartParams"], head["template"]["spec"]
    for group in cluster["spec"].get("workerGroupSpecs", []):
        yield group["groupName"], group["rayStartParams"], group["template"]["spec"]


def gpus_per_pod(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in pod["containers"])


def k8s_gpu_capacity() -> int:
    cluster = the_raycluster()
    return sum(g["maxReplicas"] * gpus_per_pod(g["template"]["spec"])
               for g in cluster["spec"]["workerGroupSpecs"])


def aws_config() -> dict:
    return yaml.safe_load((DEPLOY / "aws" / "cluster.yaml").read_text())


def aws_gpu_capacity() -> int:
    return sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0)
               for t in aws_config()["available_node_types"].values())


def dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


# ---- commands: where they come from, parsed by the real CLIs, configs resolved ----------------

@dataclass
class Command:
    source: str
    module: str
    args: list[str]
    driver_gpus: float = 0.0
    capacity: int | None = None  # GPUs of the cluster it is sent to


def parse_cli(cmd: Command) -> dict:
    """The stage's own typer app parses the arguments (unknown options and bad types raise)."""
    assert importlib.util.find_spec(cmd.module), f"{cmd.source}: no module {cmd.module}"
    app = importlib.import_module(cmd.module).app
    try:
        return typer.main.get_command(app).make_context(cmd.module, list(cmd.args)).params
    except Exception as exc:
        raise AssertionError(f"{cmd.source}: `python -m {cmd.module}`: {exc}") from exc


def resolve(cmd: Command):
    """The config the command runs with, built the way its CLI builds it."""
    from shared.config import deep_merge, load_config, parse_overrides

    p = parse_cli(cmd)
    if cmd.module == "labeling.run":
        from labeling.config import LabelConfig

        fields = set(LabelConfig.model_fields)
        assert not set(p) - fields - {"address", "config", "set_", "resume", "quiet"}
        flags = {k: v for k, v in p.items() if k in fields and v is not None}
        return load_config(LabelConfig, p["config"],
                           deep_merge(parse_overrides(list(p["set_"] or [])), flags))
    if cmd.module == "training.run":
        from training.config import TrainConfig
        from training.run import resolve_config

        assert not set(p) - set(TrainConfig.model_fields) - {"config", "overrides"}
        flags = {k: v for k, v in p.items() if k not in ("config", "overrides")}
        return resolve_config(p["config"], list(p["overrides"] or []), flags)
    from evaluation.config import EvalConfig
    from evaluation.run import flags_to_overrides

    known = {"backbone", "weights", "dataset", "data_root", "out", "tiny", "address", "config",
             "set_"}
    assert not set(p) - known, f"{cmd.source}: evaluation.run options {set(p) - known} unchecked"
    over = flags_to_overrides(p["backbone"], p["weights"], p["dataset"], p["data_root"], p["out"],
                              p["tiny"], p["address"])
    return load_config(EvalConfig, p["config"],
                       deep_merge(over, parse_overrides(list(p["set_"] or []))))


def entrypoint_command(entrypoint: str, source: str) -> tuple[str, list[str]]:
    tokens = shlex.split(entrypoint)
    assert tokens[:2] == ["python", "-m"], f"{source}: entrypoint must be `python -m <module>`"
    return tokens[2], tokens[3:]


def rayjob_commands(docs: dict[str, list[dict]], where: str) -> list[Command]:
    out = []
    for name, rayjobs in docs.items():
        for job in (d for d in rayjobs if d["kind"] == "RayJob"):
            source = f"{where}/{name}" if where == "deploy/k8s" else f"{where} ({name})"
            module, args = entrypoint_command(job["spec"]["entrypoint"], source)
            out.append(Command(source, module, args,
                               float(job["spec"].get("entrypointNumGpus", 0)),
                               k8s_gpu_capacity()))
    return out


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number, logical lines) of each ```bash block, backslash continuations joined."""
    blocks = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", m.group(1))
        blocks.append((text[: m.start()].count("\n") + 1, joined.splitlines()))
    return blocks


def expand(text: str, var: str, value: str) -> str:
    """The bash expansions the README uses: ${v//_/-}, ${v} and $v."""
    text = text.replace(f"${{{var}//_/-}}", value.replace("_", "-"))
    return re.sub(rf"\$\{{{var}\}}|\${var}\b", value, text)


def readme_lines() -> list[tuple[str, str]]:
    """(source, logical line) of every README bash line, loop variables expanded per value."""
    out = []
    for start, lines in bash_blocks((DEPLOY / "README.md").read_text()):
        loop = next((re.match(r"for (\w+) in ([^;]+); do", ln.strip()) for ln in lines
                     if ln.strip().startswith("for ")), None)
        for i, line in enumerate(lines):
            source = f"deploy/README.md block at line {start}, line {i + 1}"
            if loop and f"${loop.group(1)}" in line.replace("{", ""):
                out += [(source, expand(line, loop.group(1), v)) for v in loop.group(2).split()]
            else:
                out.append((source, line))
    return out


def parse_ray_cli(tokens: list[str], source: str) -> tuple[str, dict]:
    """(subcommand, parsed options) of a `ray ...` command line, by Ray's own click CLI."""
    import click
    from ray.scripts.scripts import cli

    cmd, args = cli, tokens[1:]
    try:
        while isinstance(cmd, click.Group):
            cmd, args = cmd.get_command(click.Context(cmd), args[0]), args[1:]
            assert cmd is not None, f"unknown subcommand in {tokens}"
        return cmd.name, cmd.make_context(cmd.name, args).params
    except Exception as exc:
        raise AssertionError(f"{source}: `{' '.join(tokens)}`: {exc}") from exc


def readme_commands() -> list[Command]:
    """Every `ray ...` line of the README parsed; the stage commands among its job submissions."""
    out = []
    for source, line in readme_lines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        ends = [i for i, t in enumerate(tokens) if set(t) <= set("();<>|&")] + [len(tokens)]
        tokens = tokens[: ends[0]]
        if "python" in tokens:
            assert tokens[:3] == ["ray", "job", "submit"], \
                f"{source}: a stage command runs on the cluster through `ray job submit ... --`"
        if tokens[:1] != ["ray"]:
            continue
        name, opts = parse_ray_cli(tokens, source)
        if name == "submit":
            assert opts["address"] == "http://127.0.0.1:8265", f"{source}: job server address"
            module, args = entrypoint_command(shlex.join(opts["entrypoint"]), source)
            out.append(Command(source, module, args, opts["entrypoint_num_gpus"] or 0.0,
                               aws_gpu_capacity()))
    return out


def readme_seds() -> list[tuple[str, str, list[str]]]:
    """(source, deploy file, sed scripts) of every README `sed` over a file of deploy/."""
    out = []
    for source, line in readme_lines():
        tokens = shlex.split(line)
        if "sed" not in tokens:
            continue
        tokens = tokens[tokens.index("sed"):]
        scripts = [tokens[i + 1] for i, t in enumerate(tokens) if t == "-e"] or [tokens[1]]
        target = next(t for t in tokens if t.startswith("deploy/"))
        out.append((source, target, scripts))
    return out


def apply_sed(text: str, scripts: list[str]) -> str:
    """``s<d>pattern<d>replacement<d>[g]`` scripts applied line by line, as sed does."""
    for script in scripts:
        _, pattern, repl, flags = script.split(script[1])
        text = "\n".join(re.sub(pattern, repl, ln, count=0 if "g" in flags else 1)
                         for ln in text.splitlines())
    return text


def all_commands() -> list[Command]:
    """The manifests' entrypoints, the README's submissions, and the README's RayJob variants."""
    cmds = rayjob_commands(k8s_docs(), "deploy/k8s") + readme_commands()
    for source, target, scripts in readme_seds():
        if Path(target).name.startswith("rayjob-"):
            text = apply_sed((ROOT / target).read_text(), scripts)
            cmds += rayjob_commands({Path(target).name: list(yaml.safe_load_all(text))}, source)
    return cmds


# ---- KubeRay manifests -------------------------------------------------------------------------

def test_manifests_are_known_kinds_with_valid_names():
    docs = k8s_docs()
    assert set(docs) == {"raycluster.yaml", "rayjob-labeling.yaml", "rayjob-training.yaml",
                         "rayjob-evaluation.yaml"}
    for name, items in docs.items():
        for d in items:
            expected = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "ServiceAccount": "v1"}
            assert d["kind"] in expected, f"{name}: unexpected kind {d['kind']}"
            assert d["apiVersion"] == expected[d["kind"]], f"{name}: apiVersion of {d['kind']}"
            assert DNS_LABEL.match(d["metadata"]["name"]), f"{name}: metadata.name"


def test_raycluster_has_a_head_and_a_gpu_worker_group():
    cluster = the_raycluster()
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC, f"unknown RayCluster fields {set(spec) - RAYCLUSTER_SPEC}"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    # the cluster runs the Ray the image pins and the tests import
    assert spec["rayVersion"] == dockerfile_args()["RAY_VERSION"] == ray.__version__
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, f"unknown worker group fields {set(group) - WORKER_GROUP}"
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if gpus_per_pod(group["template"]["spec"]) >= 1:
            gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    assert gpus_per_pod(spec["headGroupSpec"]["template"]["spec"]) == 0


def test_every_pod_is_sized_and_has_shared_memory():
    service_accounts = {d["metadata"]["name"] for _, d in of_kind("ServiceAccount")}
    images = set()
    for group, params, pod in pods(the_raycluster()):
        assert all(isinstance(v, str) for v in params.values()), \
            f"{group}: rayStartParams values must be strings (map[string]string)"
        assert pod.get("serviceAccountName") in service_accounts, f"{group}: service account"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000  # the image's user
        assert pod["containers"] and all(c.get("name") and c.get("image")
                                         for c in pod["containers"]), f"{group}: containers"
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        images |= {c["image"] for c in pod["containers"]}
        res = container["resources"]
        for key in ("cpu", "memory"):
            assert quantity(res["requests"][key]) <= quantity(res["limits"][key]), f"{group}: {key}"
        if "nvidia.com/gpu" in res["requests"]:
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], \
                f"{group}: GPU requests and limits must be equal"
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(shm) == 1, f"{group}: /dev/shm is not mounted"
        empty_dir = volumes[shm[0]["name"]]["emptyDir"]
        assert empty_dir.get("medium") == "Memory", f"{group}: /dev/shm must be a memory emptyDir"
        shm_bytes = quantity(empty_dir["sizeLimit"])
        # tmpfs pages count against the memory limit; the object store lives in /dev/shm
        assert shm_bytes < quantity(res["limits"]["memory"]) / 2, f"{group}: /dev/shm too large"
        assert int(params.get("object-store-memory", 0)) <= shm_bytes, \
            f"{group}: object-store-memory exceeds /dev/shm"
    assert len(images) == 1, f"pods run different images: {images}"


def test_one_rayjob_per_stage_on_the_raycluster():
    cluster_name = the_raycluster()["metadata"]["name"]
    stages = []
    for name, job in of_kind("RayJob"):
        spec = job["spec"]
        assert set(spec) <= RAYJOB_SPEC, f"{name}: unknown RayJob fields {set(spec) - RAYJOB_SPEC}"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
            f"{name}: exactly one of rayClusterSpec and clusterSelector"
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}, name
        module, _ = entrypoint_command(spec["entrypoint"], name)
        stage = name.removeprefix("rayjob-").removesuffix(".yaml")
        assert module == STAGE_MODULES[stage], f"{name} runs {module}"
        stages.append(stage)
    assert sorted(stages) == sorted(STAGE_MODULES)


# ---- the commands: real CLIs, resolved configs, GPU arithmetic --------------------------------

def test_every_command_parses_and_fits_its_cluster():
    cmds = all_commands()
    by_module = {m: [c for c in cmds if c.module == m] for m in STAGE_MODULES.values()}
    assert all(by_module.values()), "every stage needs a manifest and README command"
    label_sets = set()
    for cmd in by_module["labeling.run"]:
        cfg = resolve(cmd)
        assert not cfg.tiny and cfg.images != "synthetic" and cfg.out.startswith("s3://")
        assert cfg.actors * cfg.gpus_per_actor <= cmd.capacity, cmd.source
        label_sets.add(cfg.out)
    assert len(label_sets) == 1, "one label set for every encoder"
    encoders = {}
    for cmd in by_module["training.run"]:
        cfg = resolve(cmd)
        assert cfg.labels in label_sets, f"{cmd.source}: trains on {cfg.labels}, not the label set"
        assert cfg.use_gpu and 1 <= cfg.workers <= cmd.capacity, cmd.source
        cfg.accumulation_steps(cfg.workers)  # the effective batch splits over the workers
        assert encoders.setdefault(cfg.backbone, cfg.out) == cfg.out, cmd.source
    assert sorted(encoders) == sorted(ENCODERS)
    assert len(set(encoders.values())) == len(ENCODERS), "encoders overwrite each other's output"
    evaluated = set()
    for cmd in by_module["evaluation.run"]:
        cfg = resolve(cmd)
        # the driver encodes and searches the queries on a GPU of its own
        assert cmd.driver_gpus >= 1, f"{cmd.source}: reserve a GPU for the evaluation driver"
        bank_gpus = cfg.memory.workers * (cfg.memory.gpus_per_worker or 1)
        assert bank_gpus + cmd.driver_gpus <= cmd.capacity, f"{cmd.source}: bank actors wait"
        [backbone] = cfg.backbones
        assert "hub" in cfg.weights, f"{cmd.source}: compare with the pretrained encoder"
        assert f"{encoders[backbone]}/encoder.safetensors" in cfg.weights, cmd.source
        evaluated.add(backbone)
    assert evaluated == set(ENCODERS)


def test_an_unknown_option_is_caught():
    bad = Command("here", "training.run", ["--backbone", "vits14", "--num-workers", "4"])
    with pytest.raises(AssertionError, match="--num-workers"):
        parse_cli(bad)


def test_readme_encoders_are_registered_and_k8s_variants_are_valid():
    from shared.backbones import BACKBONES

    assert set(ENCODERS) <= set(BACKBONES)
    for _, lines in bash_blocks((DEPLOY / "README.md").read_text()):
        for line in lines:
            loop = re.match(r"for enc in ([^;]+); do", line.strip())
            if loop:
                assert loop.group(1).split() == ENCODERS
    names = []
    for source, target, scripts in readme_seds():
        text = (ROOT / target).read_text()
        for script in scripts:
            pattern = script.split(script[1])[1]
            assert re.search(pattern, text), f"{source}: `{script}` matches nothing in {target}"
        if Path(target).name.startswith("rayjob-"):
            for doc in yaml.safe_load_all(apply_sed(text, scripts)):
                assert DNS_LABEL.match(doc["metadata"]["name"]), source
                names.append(doc["metadata"]["name"])
    assert len(names) == len(set(names)) == 2 * len(ENCODERS), "RayJob names must differ"


def test_readme_names_existing_files():
    text = (DEPLOY / "README.md").read_text()
    for path in set(re.findall(r"deploy/[\w./-]+\w", text)):
        assert (ROOT / path).exists(), f"deploy/README.md names a missing {path}"
    for name in k8s_docs():
        assert f"deploy/k8s/{name}" in text, f"deploy/README.md never applies {name}"


# ---- the `ray up` cluster file -----------------------------------------------------------------

def test_aws_cluster_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = aws_config()
    cfg = prepare_config(copy.deepcopy(raw))  # merges ray/autoscaler/aws/defaults.yaml
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws"
    # Ray's defaults install a nightly Ray wheel at setup: the image's pinned Ray must be used
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in cfg[key]), key
    image = the_raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cfg["docker"]["image"] == image
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for name, t in types.items():
        cpus, gpus = EC2_TYPES[t["node_config"]["InstanceType"]]
        assert t["resources"].get("GPU", 0) == gpus, f"{name}: GPU count of its instance type"
        assert t["resources"]["CPU"] in (0, cpus), f"{name}: CPU count of its instance type"
        assert "IamInstanceProfile" in t["node_config"], f"{name}: nodes need a role, no keys"


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(max_worker=3), "Additional properties"),
    (lambda c: c["available_node_types"]["gpu_1x_a10g"].pop("resources"), "resources"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
])
def test_aws_validation_rejects_broken_files(mutate, error):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = aws_config()
    mutate(cfg)
    with pytest.raises(Exception, match=error):
        validate_config(prepare_config(cfg))


# ---- the Dockerfile, as text; secrets anywhere ---------------------------------------------------

def test_dockerfile_pins_and_layers():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    text = (DEPLOY / "Dockerfile").read_text()
    args = dockerfile_args()
    resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)
    assert re.search(r"^FROM nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d\d\.\d\d$",
                     text, flags=re.M), "base image: CUDA 12 runtime on Ubuntu"
    ci = (ROOT / ".ci" / "run").read_text()
    for pkg in ("torch", "torchvision"):
        pin = re.search(rf"\b{pkg}==([\w.]+)", ci).group(1)
        assert f"{pkg}=={pin}" in resolved, f"Dockerfile: {pkg} is not pinned to {pin} (.ci/run)"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in deps["dependencies"] if d.startswith("ray["))
    assert ray_pin in resolved and ray_pin.endswith(ray.__version__)
    assert "python3.11 -m venv" in text
    # faiss-cpu and the CUDA build share files: remove one, then reinstall the other over it
    [gpu_req] = deps["optional-dependencies"]["gpu"]
    install = text.index('pip install ".[gpu]"')
    uninstall = text.index("pip uninstall -y faiss-cpu")
    reinstall = text.index(f'pip install --no-deps --force-reinstall "{gpu_req}"')
    assert install < uninstall < reinstall
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert users[-1].split(":")[0] == "1000"
    env = " ".join(re.findall(r"^ENV (.*?)(?<!\\)$", text, flags=re.M | re.S))
    for var in ("HF_HOME=", "HOME=/home/dip"):
        assert var in env, f"Dockerfile: ENV {var}"


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix()
                                        for p in DEPLOY.rglob("*") if p.is_file()))
def test_no_secrets(path):
    text = (ROOT / path).read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{path} matches {pattern}"
