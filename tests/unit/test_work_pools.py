"""The GPU work pools of deploy/prefect-gpu.yaml, rendered offline by the pool types' own packages: the job
each worker would start (the Docker API payload of docker-py; the Kubernetes Job manifest of
prefect-kubernetes) from the deployment's job variables. And the image those jobs run: ./Dockerfile
installs with CI's pins. No Docker daemon, cluster or server is touched; what needs them is on paper (see
the file's header)."""

import asyncio
import copy
import json
import re
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from lora_core.config import PipelineConfig, load_recipe

REPO = Path(__file__).resolve().parents[2]
GPU_FILE = REPO / "deploy" / "prefect-gpu.yaml"
K8S_TEMPLATE = REPO / "deploy" / "kubernetes-gpu.json"
API = "http://prefect.example.com:4200/api"  # a worker's server; not called


def gpu_file() -> dict:
    return yaml.safe_load(GPU_FILE.read_text())


def deployment(name: str) -> dict:
    (dep,) = [d for d in gpu_file()["deployments"] if d["name"] == name]
    return dep


def job_variables(dep: dict) -> dict:
    """The deployment's job variables with the build step's output filled in, as `prefect deploy` does."""
    (build,) = gpu_file()["build"]
    step = build["prefect_docker.deployments.steps.build_docker_image"]
    image = f"{step['image_name']}:{step['tag']}"
    return json.loads(json.dumps(dep["work_pool"]["job_variables"]).replace("{{ build-image.image }}", image))


def dockerfile_workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    return workdir


def render(configuration_cls, template: dict, variables: dict):
    """What a worker does with a flow run: the pool's template + the deployment's variables, then the run's
    command, environment and name."""

    # a client for a server that is never called: the variables name no block or Prefect variable
    async def fill():
        return await configuration_cls.from_template_and_values(
            template, variables, client=PrefectClient(API)
        )

    config = asyncio.run(fill())
    with temporary_settings({PREFECT_API_URL: API}):
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-otter"))
    return config


@pytest.mark.parametrize("name", ["socratic-tutor-nightly-docker", "socratic-tutor-nightly-k8s"])
def test_each_gpu_deployment_carries_the_recipe_with_one_process_per_gpu(name):
    dep = deployment(name)
    config = PipelineConfig.model_validate(dep["parameters"]["config"])  # a typed config, not a recipe path
    recipe = load_recipe(REPO / "recipes" / "socratic-tutor.yaml", ["train.num_processes=2"])
    assert config == recipe
    gpus = (
        job_variables(dep).get("gpus")
        or job_variables(dep)["container_create_kwargs"]["device_requests"][0]["count"]
    )
    assert gpus == config.train.num_processes == 2
    for path in (config.data.path, config.eval.prompts_path):  # relative to the image's working directory
        assert (REPO / path).is_file()
    (pull,) = gpu_file()["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == dockerfile_workdir()


def test_the_docker_pool_starts_a_container_with_two_gpus_volumes_and_the_tracking_server():
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    variables = job_variables(deployment("socratic-tutor-nightly-docker"))
    config = render(DockerWorkerJobConfiguration, DockerWorker.get_default_base_job_template(), variables)
    settings = DockerWorker(work_pool_name="gpu-docker")._build_container_settings(None, config)
    # docker-py's own translation to the API
    payload = _create_container_args({**settings, "version": "1.44"})
    host = payload["host_config"]

    assert payload["image"] == "registry.example.com/lora-flow:latest"
    assert payload["command"] == "prefect flow-run execute"
    ((request),) = host["DeviceRequests"]
    assert request["Driver"] == "nvidia" and request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    workdir = dockerfile_workdir()
    assert sorted(host["Binds"]) == [
        f"lora-flow-cache:{workdir}/.cache",
        f"lora-flow-outputs:{workdir}/outputs",
    ]
    assert host["ShmSize"] == 8 * 1024**3
    env = payload["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000" and env["PREFECT_API_URL"] == API
    # results on the volume
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith(f"{workdir}/outputs/")


def test_the_kubernetes_template_is_the_package_default_plus_gpus_and_volumes():
    from prefect_kubernetes.worker import KubernetesWorker

    default, ours = KubernetesWorker.get_default_base_job_template(), json.loads(K8S_TEMPLATE.read_text())
    assert set(ours["variables"]["properties"]) - set(default["variables"]["properties"]) == {
        "gpus",
        "outputs_claim",
        "shm_size",
    }
    assert {
        k: v
        for k, v in ours["variables"]["properties"].items()
        if k in default["variables"]["properties"]
        # regenerate the file when prefect-kubernetes changes its template
    } == default["variables"]["properties"]
    stripped = copy.deepcopy(ours["job_configuration"])
    pod = stripped["job_manifest"]["spec"]["template"]["spec"]
    for key in ("volumes", "tolerations"):
        del pod[key]
    del pod["containers"][0]["volumeMounts"], pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert stripped == default["job_configuration"]


def test_the_kubernetes_pool_renders_a_job_with_two_gpus_a_volume_and_the_tracking_server():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    variables = job_variables(deployment("socratic-tutor-nightly-k8s"))
    config = render(KubernetesWorkerJobConfiguration, json.loads(K8S_TEMPLATE.read_text()), variables)
    job = config.job_manifest
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    assert job["metadata"]["namespace"] == "ml" and job["spec"]["backoffLimit"] == 0
    assert container["image"] == "registry.example.com/lora-flow:latest"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    workdir = dockerfile_workdir()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert (
        mounts[f"{workdir}/outputs"]["name"] == "outputs"
        and mounts[f"{workdir}/.cache"]["subPath"] == "cache"
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["outputs"]["persistentVolumeClaim"] == {"claimName": "lora-flow-outputs"}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory" and mounts["/dev/shm"]["name"] == "shm"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000" and env["PREFECT_API_URL"] == API
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith(f"{workdir}/outputs/")


def test_the_image_installs_with_the_pins_ci_uses():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY [^\n]*\bconstraints\.txt\b", text, re.M)
    installs = re.findall(r"pip install[^\n\\&]*", text)
    assert len(installs) >= 2 and all("-c constraints.txt" in line for line in installs), installs
    assert "download.pytorch.org/whl/cpu" in re.search(r"^ARG TORCH_INDEX=(\S+)", text, re.M).group(1)
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    # what `-c constraints.txt` holds the image to
    assert pins["torch"] and pins["prefect"] and pins["mlflow"]


def test_the_build_context_has_the_code_and_data_and_leaves_out_the_local_state():
    # what docker-py sends as the build context, .dockerignore applied
    from docker.utils.build import exclude_paths

    patterns = [
        p for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    sent = exclude_paths(str(REPO), patterns, dockerfile="Dockerfile")
    needed = {
        "Dockerfile",
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "lora_core/launch.py",
        "flows/launch.py",
        "flows/finetune.py",
        "ops/stack.py",
        "data/socratic_tutor.jsonl",
        "data/socratic_tutor_more.jsonl",
        "data/socratic_tutor_heldout.jsonl",
        "recipes/socratic-tutor.yaml",
        "mlflow/serve.sh",
    }
    assert needed <= sent
    assert not any(p.startswith((".venv/", ".git/", "outputs/", "tests/")) or p.endswith(".db") for p in sent)
