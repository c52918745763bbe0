"""docker-compose.yaml, checked without Docker: the Compose schema, the loopback topology's
variable names, the Dockerfiles it builds from, the variables .env.example must provide.

compose-spec.json is the Compose Specification's schema (compose-spec/compose-spec,
schema/compose-spec.json, Apache-2.0), the copy that the npm package dclint 3.1.0 ships as
schemas/compose.schema.json; vendored because the tests run offline.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.env_file import filled
from cluster.topology import LOOPBACK_ONLY, Ports, Secrets, service_environments

REPO = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("compose-spec.json")
# Compose services the loopback cluster does not start, and why.
NOT_ON_LOOPBACK = {"airflow-triggerer": "the DAG defers no task; it has the scheduler's environment"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def loopback() -> dict[str, dict[str, str]]:
    return service_environments(Ports.free(), Secrets.generate(), Path("/tmp/home"), REPO, "/venv/bin/python")


def schema_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []


def test_the_schema_rejects_a_misspelt_key(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["airflow-worker"]["enviroment"] = {}
    assert any("enviroment" in error for error in schema_errors(broken))


def test_each_service_reads_the_variables_its_loopback_process_gets(compose: dict[str, Any], loopback: dict[str, dict[str, str]]) -> None:
    services = compose["services"]
    assert set(services) == set(loopback) | set(NOT_ON_LOOPBACK)
    counterpart = {**{name: name for name in loopback}, "airflow-triggerer": "airflow-scheduler"}
    for name, service in services.items():
        expected = set(loopback[counterpart[name]]) - set(LOOPBACK_ONLY)
        assert set(service.get("environment", {})) == expected, name


def test_every_image_of_ours_is_built_from_a_dockerfile_here(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" not in service:
            assert not service["image"].startswith("laion-"), f"{name} uses an image of ours without building it"
            continue
        context = REPO / service["build"]["context"]
        dockerfile = context / service["build"]["dockerfile"]
        assert dockerfile.is_file(), name
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert source == "." or list(context.glob(source)), f"{dockerfile.name}: COPY {source} is missing"
    built = {s["image"] for s in compose["services"].values() if "build" in s}
    used = {s["image"] for s in compose["services"].values() if s["image"].startswith("laion-")}
    assert used == built == {"laion-airflow:latest", "laion-airflow-gpu:latest", "laion-spark:latest"}


def test_env_example_names_every_variable_and_holds_no_secret(compose: dict[str, Any]) -> None:
    text = (REPO / "docker-compose.yaml").read_text()
    read = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = (REPO / ".env.example").read_text()
    names = set(re.findall(r"^#? ?([A-Z0-9_]+)=", example, re.MULTILINE))
    assert read <= names, read - names
    secrets = Secrets.__dataclass_fields__
    for name in secrets:
        assert re.search(rf"^{name}=$", example, re.MULTILINE), f"{name} must be empty in .env.example"
        assert f"${{{name}:?" in text, f"{name} must be required (no default) in docker-compose.yaml"
    generated = dict(line.split("=", 1) for line in filled(example, Secrets.generate()).splitlines() if re.match(r"^[A-Z]", line))
    assert all(generated[name] for name in secrets)


def test_published_ports_bind_to_the_configured_address(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${LAION_BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"


def test_queues_and_the_gpu_reservation(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["airflow-worker"]["command"][-2:] == ["--queues", "default"]
    gpu = services["airflow-worker-gpu"]
    assert gpu["command"][-2:] == ["--queues", "gpu"]
    assert gpu["build"]["args"]["LAION_VARIANT"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == "${LAION_GPU_SLOTS:-1}" == gpu["environment"]["LAION_GPU_SLOTS"]
