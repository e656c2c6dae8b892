"""Shared fixtures. Markers are applied by directory: tests under integration/ are `integration`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlm_service.config import Settings

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where the tiny checkpoints are: VLM_TEST_CACHE_DIR if set, else where the server looks
    ($VLM_CACHE_DIR or ~/.cache/vlm-service). `make test` builds them there first (`make checkpoints`):
    building them inside a test's setup can take longer than the per-test timeout on a small CPU."""
    configured = os.environ.get("VLM_TEST_CACHE_DIR") or os.environ.get("VLM_CACHE_DIR")
    return Path(configured).expanduser() if configured else Settings().cache_dir


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(cache_dir) -> Path:
    """tiny-smolvlm as the code builds it (not the copy shipped with the package, which
    tests/integration/test_front_door.py checks against this one)."""
    from vlm_checkpoints.builder import fresh_builds
    from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm

    with fresh_builds():
        return ensure_tiny_smolvlm(cache_dir)


@pytest.fixture(scope="session")
def noise_dir(cache_dir) -> Path:
    """tiny-smolvlm with random weights: it writes noise and seldom ends, for long generations."""
    from vlm_checkpoints.tiny_smolvlm import ensure_tiny_smolvlm

    return ensure_tiny_smolvlm(cache_dir, trained=False)


@pytest.fixture
def settings(cache_dir) -> Settings:
    return Settings(cache_dir=cache_dir, grace_period=0.0)
