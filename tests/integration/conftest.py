from __future__ import annotations

import pytest

from tests import fakes
from tests.helpers import ServerThread
from vlm_service.backends.decode_batch import DecodeBatch
from vlm_service.config import Settings


@pytest.fixture(scope="session")
def smolvlm_server(cache_dir, tiny_smolvlm_dir, noise_dir):
    """One real server for the session: the trained tiny-smolvlm (default) and `noise`, the same
    architecture with random weights, for generations that must run long."""
    server = ServerThread(
        Settings(models=["tiny-smolvlm", f"noise={noise_dir}"], cache_dir=cache_dir, grace_period=0.0)
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def stub(smolvlm_server):
    with smolvlm_server.channel() as channel:
        yield smolvlm_server.stub(channel)


@pytest.fixture(scope="session")
def families_server(cache_dir, noise_dir):
    """One real server with the three tiny families (the first is the default), and each family's
    random-weights twin (`noise-<family>`) for generations that must run long."""
    from vlm_checkpoints.tiny_moondream import ensure_tiny_moondream
    from vlm_checkpoints.tiny_qwen2_vl import ensure_tiny_qwen2_vl

    noise = {
        "noise-smolvlm": noise_dir,
        "noise-qwen2-vl": ensure_tiny_qwen2_vl(cache_dir, trained=False),
        "noise-moondream": ensure_tiny_moondream(cache_dir, trained=False),
    }
    models = ["tiny-smolvlm", "tiny-qwen2-vl", "tiny-moondream"] + [f"{n}={path}" for n, path in noise.items()]
    server = ServerThread(Settings(models=models, cache_dir=cache_dir, grace_period=0.0))
    server.wait_ready(timeout=900)
    yield server
    server.stop()


@pytest.fixture
def fake(tmp_path, cache_dir):
    """Start servers with the fake model: ``fake(**settings)``; all are stopped afterwards (a step
    gate a test left closed is opened first, so no generation waits on it)."""
    fakes.FakeBackend.reset()
    checkpoint = fakes.register(tmp_path)
    servers = []

    def start(**settings):
        server = ServerThread(Settings(models=[f"fake={checkpoint}"], cache_dir=cache_dir, **settings))
        server.wait_ready()
        servers.append(server)
        return server

    yield start
    if fakes.FakeBackend.step_gate is not None:
        fakes.FakeBackend.step_gate.set()
    fakes.FakeBackend.step_delay = 0.0
    for server in servers:
        server.stop()
    fakes.FakeBackend.reset()


@pytest.fixture
def noise_server(cache_dir, noise_dir):
    """Start servers of `noise` with the given settings: ``noise_server(**settings)``; all stop afterwards."""
    servers = []

    def start(**settings):
        server = ServerThread(Settings(models=[f"noise={noise_dir}"], cache_dir=cache_dir, grace_period=0, **settings))
        server.wait_ready()
        servers.append(server)
        batch = server.engine.models["noise"].scheduler.batch
        assert isinstance(batch, DecodeBatch) and batch.max_rows > 1
        return server

    yield start
    for server in servers:
        server.stop()
