"""The vlm-client distribution on its own: its wheel (built from clients/ as a release builds it, or the one
CI built, $VLM_CLIENT_WHEEL) installed alone into a fresh virtual environment, without torch, transformers
or this checkout on the path, streams a caption from a real server, from Python and from its CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from tests import fakes
from tests.helpers import ServerThread, png_bytes, shape_image
from vlm_service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent(
    """
    import sys
    import vlm_client
    from vlm_client import VLMClient

    assert "/clients/" not in vlm_client.__file__, vlm_client.__file__  # the installed copy, not the checkout
    with VLMClient(sys.argv[1], timeout=60) as client:
        stream = client.caption(sys.argv[2], length="short")
        chunks = list(stream)
        print(len(chunks), repr(stream.text), stream.finish_reason, stream.usage.completion_tokens)
        print(client.models()[0].name)
    """
)


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    if os.environ.get("VLM_CLIENT_WHEEL"):
        return Path(os.environ["VLM_CLIENT_WHEEL"])
    out = tmp_path_factory.mktemp("dist")
    # sdist first, then the wheel from the unpacked sdist: the contract must travel inside the sdist.
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT / "clients")])
    (wheel,) = out.glob("vlm_client-*.whl")
    return wheel


@pytest.fixture(scope="module")
def client_env(client_wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the client wheel and its dependencies, nothing else."""
    env_dir = tmp_path_factory.mktemp("client-env") / "venv"
    venv.create(env_dir, with_pip=True)
    _run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", str(client_wheel)])
    return env_dir


def test_the_wheel_carries_the_stubs_type_stubs_and_the_cli(client_wheel):
    names = set(zipfile.ZipFile(client_wheel).namelist())
    for module in ("vlm_service_pb2.py", "vlm_service_pb2.pyi", "vlm_service_pb2_grpc.py", "__init__.py"):
        assert f"vlm/v1/{module}" in names
    assert {"vlm_client/client.py", "vlm_client/cli.py", "vlm_client/py.typed", "vlm/py.typed"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "vlm-client = vlm_client.cli:main" in zipfile.ZipFile(client_wheel).read(entry_points).decode()
    assert not any(name.startswith(("vlm_service/", "tests/", "protos/")) for name in names)


def test_the_client_installs_without_torch_or_the_server(client_env):
    installed = _run([str(client_env / "bin" / "python"), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    packages = {line.split("==")[0] for line in installed.split()}
    assert {"vlm-client", "grpcio", "grpcio-status", "protobuf"} <= packages
    assert not packages & {"torch", "transformers", "vlm-service", "pillow", "numpy"}, packages


@pytest.fixture
def fake_server(tmp_path, cache_dir):
    fakes.FakeBackend.reset()
    server = ServerThread(Settings(models=[f"fake={fakes.register(tmp_path)}"], cache_dir=cache_dir))
    server.wait_ready()
    yield server
    server.stop()
    fakes.FakeBackend.reset()


def test_the_client_alone_streams_a_caption_from_a_server(client_env, fake_server, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(shape_image("red")))
    # -I: no checkout, user site or PYTHON* variables on the path; run from an empty directory.
    python = [str(client_env / "bin" / "python"), "-I", "-c", SCRIPT, fake_server.target, str(image)]
    chunks, rest = _run(python, cwd=tmp_path).stdout.split(" ", 1)
    assert int(chunks) >= 1 and rest.splitlines() == ["'Hello, world.' stop 5", "fake"]
    result = _run([str(client_env / "bin" / "vlm-client"), "caption", str(image), "--server", fake_server.target])
    assert result.stdout == "Hello, world.\n"
    result = _run([str(client_env / "bin" / "vlm-client"), "--version"])
    assert result.stdout.startswith("vlm-client 0.1.0")
