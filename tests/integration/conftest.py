from __future__ import annotations

import pytest

from tests.helpers import ServerThread
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
def families_server(cache_dir):
    """One real server with the three tiny families (the first is the default)."""
    server = ServerThread(
        Settings(models=["tiny-smolvlm", "tiny-qwen2-vl", "tiny-moondream"], cache_dir=cache_dir, grace_period=0.0)
    )
    server.wait_ready(timeout=900)
    yield server
    server.stop()
