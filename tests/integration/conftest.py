from __future__ import annotations

import pytest

from tests.helpers import ServerThread
from vlm_service.config import Settings


@pytest.fixture(scope="session")
def smolvlm_server(cache_dir, tiny_smolvlm_dir):
    """One real server with tiny-smolvlm for the session (loading is the slow part)."""
    server = ServerThread(Settings(models=["tiny-smolvlm"], cache_dir=cache_dir, grace_period=0.0))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture
def stub(smolvlm_server):
    with smolvlm_server.channel() as channel:
        yield smolvlm_server.stub(channel)
