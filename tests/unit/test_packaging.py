"""No Docker engine runs here, so the Dockerfile and docker-compose.yml are checked by parsing them
against the Makefile, the settings declaration and the CLI they call."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from vlm_service.cli import build_parser
from vlm_service.config import Settings, settings_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile():
    return (ROOT / "Dockerfile").read_text()


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} :?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile has no {name}"
    return match.group(1).strip()


def test_dockerfile_installs_with_the_makefile_and_copies_what_it_needs(dockerfile):
    assert re.search(r"^RUN make install VENV=\S+ EXTRAS=", dockerfile, re.M)
    for path in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    # Everything the package build needs is copied: the protos (for the stubs), both distributions and
    # both packages of the server's (the runtime and the checkpoint builders).
    copied = " ".join(re.findall(r"^COPY (.+)$", dockerfile, re.M))
    for needed in ("protos", "vlm_service", "vlm_checkpoints", "clients", "pyproject.toml", "Makefile"):
        assert needed in copied


def test_dockerfile_port_healthcheck_and_command(dockerfile):
    assert f"EXPOSE {Settings().port}" in dockerfile
    health = re.search(
        r"CMD (\[.+\])\s*$", dockerfile.split("HEALTHCHECK", 1)[1].split("\n\n")[0].replace("\\\n", ""), re.M
    )
    assert health
    command = yaml.safe_load(health.group(1))
    assert command[:2] == ["vlm-service", "health"]
    build_parser().parse_args(command[1:])
    cmd = yaml.safe_load(re.findall(r"^CMD (\[.+\])$", dockerfile, re.M)[-1])
    assert cmd == ["vlm-service", "serve"]


def test_compose_services_match_the_image_and_settings(compose, dockerfile):
    env_names = {spec.env for spec in settings_table()}
    hf_home = re.search(r"HF_HOME=(\S+)", dockerfile).group(1)
    assert {"vlm", "vlm-gpu"} <= set(compose["services"])
    for name, service in compose["services"].items():
        assert service["build"] == "."
        assert "50051:50051" in service["ports"]
        assert service["environment"]["VLM_PORT"] == str(Settings().port)
        for key in service["environment"]:
            assert key in env_names or key.startswith("HF_"), f"{name}: {key} is not a setting"
        # The Hugging Face cache lives on the volume.
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert source in compose["volumes"] and hf_home.startswith(target)
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:3] == ["vlm-service", "health"]
        build_parser().parse_args(test[2:])


def test_compose_defaults_are_valid_settings(compose):
    for service in compose["services"].values():
        for key, value in service["environment"].items():
            default = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
            service["environment"][key] = default.group(1) if default else str(value)
        env = {k: v for k, v in service["environment"].items() if k.startswith("VLM_")}
        from vlm_service.config import load_settings

        settings = load_settings(None, env)
        assert settings.port == 50051


def test_gpu_variant_reserves_a_gpu(compose):
    gpu = compose["services"]["vlm-gpu"]
    assert gpu["environment"]["VLM_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert compose["services"]["vlm"]["environment"]["VLM_DEVICE"] == "cpu"


def test_makefile_targets_exist():
    text = (ROOT / "Makefile").read_text()
    for target in ("install", "proto", "serve", "test", "lint", "bench"):
        assert re.search(rf"^{target}:", text, re.M), f"make {target} is missing"
    assert "--pyi_out" in text
    assert shlex.split(makefile_variable("TORCH"))[0].startswith("torch==")


def test_readme_configuration_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    for spec in settings_table():
        assert f"| `{spec.flag}` | `{spec.env}` |" in readme, f"README misses {spec.flag}"
    for command in ("make serve", "make test", "grpcurl -plaintext", "vlm-client caption", "docker compose up"):
        assert command in readme
