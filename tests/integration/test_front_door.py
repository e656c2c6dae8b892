"""A new user's first minutes: the default model ships with the package, so a fresh install serves in
seconds from an empty cache; the shipped weights are the ones the code builds; a token file keeps the
token out of ``ps``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ServerThread, query_request
from tests.integration.test_demo_model import held_out_accuracy
from tests.integration.test_outside_clients import wait_serving
from vlm.v1 import vlm_service_pb2 as pb
from vlm_checkpoints import builder, ship, tiny_smolvlm
from vlm_client import Unauthenticated, VLMClient
from vlm_service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHIPPED = builder.SHIPPED_DIR / "tiny-smolvlm"
RED_CIRCLE = (ROOT / "examples" / "red-circle.png").read_bytes()
BLUE_SQUARE = (ROOT / "examples" / "blue-square.png").read_bytes()


def assert_shipped_copy_is_current() -> None:
    record_file = SHIPPED / builder.INPUTS_FILE
    assert record_file.is_file(), "no shipped tiny-smolvlm: run `make ship` and commit vlm_checkpoints/shipped/"
    record = json.loads(record_file.read_text())
    current = tiny_smolvlm.build_inputs(True)
    changed = sorted(part for part in current.parts if record["parts"].get(part) != current.parts[part])
    assert record["key"] == current.key, (
        f"the shipped tiny-smolvlm is stale (changed: {', '.join(changed)}): run `make ship` and commit "
        "vlm_checkpoints/shipped/"
    )


@pytest.mark.parametrize("name", sorted(ship.SHIPPED))
def test_every_shipped_checkpoint_is_current(name, tmp_path, monkeypatch):
    """What a fresh install (and `make checkpoints`) takes instead of training: each shipped copy's key
    is the one the code gives, so none is built here."""

    def stale(*_):
        raise AssertionError(f"the shipped {name} is stale: run `make ship` and commit vlm_checkpoints/shipped/")

    monkeypatch.setattr(builder, "run_isolated", stale)
    assert ship.SHIPPED[name](tmp_path) == builder.SHIPPED_DIR / name
    assert not any(tmp_path.iterdir()), "nothing is built or cached"


#: Keys a library writes about itself into a saved file (its version): they change nothing the model does.
WRITER_KEYS = frozenset({"transformers_version"})


def behaviour_of(path: Path):
    """A checkpoint file as what it decides: JSON parsed (key order and layout do not matter) with the
    writer's version keys left out, at any depth; any other file as its text."""

    def strip(value):
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key not in WRITER_KEYS}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    if path.suffix == ".json":
        return strip(json.loads(path.read_text()))
    return path.read_text()


def test_the_comparison_of_shipped_files_ignores_only_the_writers_version(tmp_path):
    """A later transformers writes its own version into config.json: the same settings still compare
    equal; a changed setting does not."""
    config = json.loads((SHIPPED / "config.json").read_text())
    (tmp_path / "same.json").write_text(json.dumps({**config, "transformers_version": "9.99.0"}, indent=4))
    assert behaviour_of(tmp_path / "same.json") == behaviour_of(SHIPPED / "config.json")
    changed = {**config, "text_config": {**config["text_config"], "rope_theta": 1.0}}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    assert behaviour_of(tmp_path / "changed.json") != behaviour_of(SHIPPED / "config.json")


def test_the_shipped_tiny_smolvlm_is_what_the_code_builds(tiny_smolvlm_dir, cache_dir):
    assert_shipped_copy_is_current()
    assert tiny_smolvlm_dir.name == f"tiny-smolvlm-{tiny_smolvlm.build_inputs(True).key}"
    files = sorted(path.name for path in SHIPPED.iterdir())
    assert files == sorted(path.name for path in tiny_smolvlm_dir.iterdir())
    # What decides behaviour is the same: the tokenizer, the processor, the model and generation settings
    # and the chat template, as parsed, less the version of the library that wrote each file.
    for name in files:
        if name != "model.safetensors":
            assert behaviour_of(SHIPPED / name) == behaviour_of(tiny_smolvlm_dir / name), name
    shipped, built = load_file(SHIPPED / "model.safetensors"), load_file(tiny_smolvlm_dir / "model.safetensors")
    assert shipped.keys() == built.keys()
    differ = [name for name in shipped if not torch.equal(shipped[name], built[name])]
    if differ:
        # Another CPU (or torch build) may round the training differently in the last bits.
        largest = max(float((shipped[name] - built[name]).abs().max()) for name in differ)
        print(f"{len(differ)} of {len(shipped)} tensors differ from this machine's build (largest: {largest:.2e})")
    # Either way, the shipped copy answers the demo questions right, through a real server.
    server = ServerThread(Settings(models=[f"shipped={SHIPPED}"], cache_dir=cache_dir, grace_period=0.0))
    try:
        server.wait_ready()
        with server.channel() as channel:
            stub = server.stub(channel)
            caption = "".join(m.text for m in stub.Caption(pb.CaptionRequest(image=pb.Image(data=RED_CIRCLE))))
            question = query_request("What colour is the shape?")
            question.image.data = BLUE_SQUARE
            answer = "".join(m.text for m in stub.Query(question))
            accuracy = held_out_accuracy(stub, "shipped")
    finally:
        server.stop()
    assert caption == "A red circle on a white background."
    assert answer == "The shape is blue."
    assert accuracy >= 0.8


def test_a_fresh_install_serves_the_shipped_model_at_once_with_a_token_from_a_file(tmp_path):
    """`vlm-service serve` on an empty cache answers without building anything; the token, read from a
    file, appears neither in the process's command line nor in its environment."""
    assert_shipped_copy_is_current()  # else this would train for minutes
    token = "t0ken-from-a-file"
    token_file = tmp_path / "token"
    token_file.write_text(f"\n  {token}  \n")
    cache = tmp_path / "empty-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_")} | {"VLM_CACHE_DIR": str(cache)}
    start = time.monotonic()
    process = subprocess.Popen(
        [str(BIN / "vlm-service"), "serve", "--host", "127.0.0.1", "--port", "0", "--auth-token-file", str(token_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("vlm-service listening on "), line + process.stderr.read()
        target = line.split()[-1]
        wait_serving(target, timeout=120)  # health needs no token
        with VLMClient(target, token=token, timeout=30) as client:
            caption = client.caption(RED_CIRCLE).result()
            elapsed = time.monotonic() - start
            with VLMClient(target, token="wrong", timeout=10) as stranger, pytest.raises(Unauthenticated):
                stranger.caption(RED_CIRCLE).result()
            for exposed in (f"/proc/{process.pid}/cmdline", f"/proc/{process.pid}/environ"):
                assert token.encode() not in Path(exposed).read_bytes(), exposed
        print(f"start of `vlm-service serve` to the first caption, on an empty cache: {elapsed:.1f} s")
        assert caption == "A red circle on a white background."
        assert not cache.exists() or not any(cache.iterdir()), "nothing is built: the shipped copy is served"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    log = process.stderr.read()
    assert "building checkpoint" not in log and "Traceback" not in log, log
