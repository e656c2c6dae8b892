"""No Docker engine runs here, so the Dockerfile and docker-compose.yml are checked by parsing them
against the Makefile, the settings declaration and the CLI they call."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    match = re.search(rf"^{name} [:?]?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
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
    for target in ("install", "proto", "serve", "test", "lint", "bench", "lock", "fresh-check"):
        assert re.search(rf"^{target}:", text, re.M), f"make {target} is missing"
    assert "--pyi_out" in text
    assert makefile_variable("LOCK") == "requirements/dev.lock"
    # The torch wheels the project is tested with are what the dev lock is compiled with.
    dev_in = (ROOT / "requirements" / "dev.in").read_text()
    assert lock_pins(ROOT / "requirements" / "dev.lock")["torch"] == re.search(r"^torch==(\S+)$", dev_in, re.M).group(1)


def docs_generator():
    """docs/gen_pages.py, which `make docs` runs to render the generated parts of the site."""
    spec = importlib.util.spec_from_file_location("docs_gen_pages", ROOT / "docs" / "gen_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_lists_every_setting():
    """The configuration page's table is rendered from Settings when the site is built: every setting's
    flag, environment variable and default is a row of it, in declaration order, and the page holds the
    marker where the table goes (and no hand-written table that could drift)."""
    gen = docs_generator()
    table = gen.render_settings_table()
    rows = [line for line in table.splitlines() if line.startswith("| `--")]
    specs = settings_table()
    assert len(rows) == len(specs)
    for row, spec in zip(rows, specs, strict=True):
        assert row.startswith(f"| `{spec.flag}` | `{spec.env}` | "), f"the table's row for {spec.flag}: {row}"
        assert spec.help.split(";")[0].split(".")[0] in row
    assert "| `--port` | `VLM_PORT` | `50051` |" in table
    assert "| `--model` | `VLM_MODELS` | `tiny-smolvlm` |" in table
    assert "| `--cache-dir` | `VLM_CACHE_DIR` | `~/.cache/vlm-service` |" in table
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page.count(gen.SETTINGS_MARKER) == 1
    assert "| `--" not in page, "configuration.md holds a hand-written settings row; the table is generated"
    # The generator would fail the build if a page lost its marker.
    with pytest.raises(ValueError):
        gen.fill(page.replace(gen.SETTINGS_MARKER, ""), gen.SETTINGS_MARKER, table)


def test_the_api_reference_is_rendered_from_the_protos():
    gen = docs_generator()
    reference = gen.render_api_reference()
    proto = (ROOT / "protos" / "vlm" / "v1" / "vlm_service.proto").read_text()
    for kind, name in re.findall(r"^(service|message|enum) (\w+)", proto, re.M):
        assert f"### {kind.capitalize()} `{name}`" in reference, f"the reference misses {kind} {name}"
    for rpc in re.findall(r"^\s+rpc (\w+)\(", proto, re.M):
        assert f"| `{rpc}` |" in reference
    # A field's comment comes with it.
    assert "| `top_p` | 3 | `float` | Nucleus sampling mass in (0, 1]; 0 means 1 (disabled). |" in reference
    assert (ROOT / "docs" / "api.md").read_text().count(gen.API_MARKER) == 1


def test_readme_is_a_front_door_that_links_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for command in ("make serve", "make test", "grpcurl -plaintext", "client.watch(", "VLMClient("):
        assert command in readme
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links into docs/"
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    docs = " ".join(path.read_text() for path in (ROOT / "docs").glob("*.md"))
    for command in ("vlm-client caption", "docker compose up", "make docs"):
        assert command in docs


# --- the lock files --------------------------------------------------------------------------------

#: Each lock file and the extras of the project it was compiled with (requirements/*.in).
LOCKS = {"dev.lock": ("dev", "bench"), "runtime.lock": ()}
#: This checkout's own distributions: installed from the tree, never from the lock.
OWN = {"vlm-client", "vlm-service"}


def lock_pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a pip-compile lock file (``name==version \\`` lines)."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def lock_disagreements(lock: Path, pyprojects: list[Path], extras: tuple[str, ...]) -> list[str]:
    """What ``lock`` lacks or pins outside a range that ``pyprojects`` ask for (with ``extras``); every
    pin must carry hashes."""
    pins = lock_pins(lock)
    text = lock.read_text()
    problems = [f"{name} has no --hash" for name in pins if not re.search(rf"(?im)^{name}==\S+ \\\n\s+--hash=", text)]
    for pyproject in pyprojects:
        project = tomllib.loads(pyproject.read_text())["project"]
        wanted = list(project.get("dependencies", []))
        for extra in extras:
            wanted += project.get("optional-dependencies", {}).get(extra, [])
        for spec in wanted:
            requirement = Requirement(spec)
            name = canonicalize_name(requirement.name)
            if name in OWN or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
                continue
            if name not in pins:
                problems.append(f"{lock.name} lacks {spec} ({pyproject.relative_to(pyproject.parents[1])})")
            elif not requirement.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{lock.name} pins {name}=={pins[name]}, outside {spec}")
    return problems


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_pins_every_requirement_of_pyproject_within_its_range(lock):
    problems = lock_disagreements(
        ROOT / "requirements" / lock, [ROOT / "pyproject.toml", ROOT / "clients" / "pyproject.toml"], LOCKS[lock]
    )
    assert not problems, "the lock and pyproject.toml disagree (run `make lock`): " + "; ".join(problems)


def test_a_requirement_the_lock_lacks_or_pins_outside_its_range_is_reported(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pyproject = tmp_path / "project" / "pyproject.toml"
    pyproject.parent.mkdir()
    deps = [*project["dependencies"], "a-package-nobody-locked>=1", "torch>=99"]
    pyproject.write_text("[project]\ndependencies = [" + ", ".join(f'"{d}"' for d in deps) + "]\n")
    problems = lock_disagreements(ROOT / "requirements" / "runtime.lock", [pyproject], ())
    assert len(problems) == 2, problems
    assert "lacks a-package-nobody-locked>=1" in problems[0]
    assert "pins torch==2.14.1, outside torch>=99" in problems[1]


def test_the_runtime_lock_takes_the_dev_locks_versions():
    """The Docker image runs the versions the tests ran."""
    dev, runtime = lock_pins(ROOT / "requirements" / "dev.lock"), lock_pins(ROOT / "requirements" / "runtime.lock")
    assert runtime.keys() <= dev.keys()
    assert {name: version for name, version in runtime.items() if dev[name] != version} == {}


def test_every_install_goes_through_a_lock(dockerfile):
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert re.search(r"--no-deps --no-build-isolation -e \./clients", makefile)
    assert "LOCK=requirements/runtime.lock" in dockerfile and "COPY requirements" in dockerfile
