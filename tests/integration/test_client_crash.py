"""A crash: `kill -9` of a real `vlm-service serve` process mid-stream, then a new one on the same port.
The stream that was running fails with UNAVAILABLE at once (it had received messages, so it is not
retried); a call made while no server runs waits (wait_for_ready, with client-side health checking: for a
server whose health says SERVING) and is answered by the restarted server; and the client whose stream
broke gets its next calls through on the same channel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import png_bytes, shape_image
from tests.integration.test_outside_clients import free_port, wait_serving
from vlm_client import Unavailable, VLMClient

BIN = Path(sys.executable).parent


def _serve(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "vlm-service"), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_a_call_survives_a_server_killed_and_restarted_on_the_same_port(cache_dir, noise_dir, tmp_path):
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(shape_image("red")))
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "VLM_CACHE_DIR": str(cache_dir),
        "VLM_PORT": str(port),
        "VLM_HOST": "127.0.0.1",
        "VLM_MODELS": f"noise={noise_dir}",
        "VLM_GRACE_PERIOD": "0",
    }
    servers = [_serve(env)]
    try:
        wait_serving(target)
        with VLMClient(target, timeout=300, wait_for_ready=True, health_check=True) as client:
            chunks = iter(client.caption(image, max_new_tokens=1500))
            assert next(chunks)
            servers[0].send_signal(signal.SIGKILL)
            assert servers[0].wait(10) == -signal.SIGKILL
            with pytest.raises(Unavailable) as lost:
                for _ in chunks:
                    pass
            # The kernel closes the dead process's sockets: the client learns of it from the closed
            # connection at once, not from a keepalive timeout (30 s + 10 s by default).
            print(f"the client's error: {lost.value.details!r}")
            assert "keepalive" not in lost.value.details.lower() and "timeout" not in lost.value.details.lower()

            # A call made while nothing listens on the port waits for a server that reports SERVING...
            answer: dict = {}

            def call() -> None:
                try:
                    stream = client.caption(image, max_new_tokens=8)
                    answer["text"] = stream.result()
                    answer["stream"] = stream
                except Exception as error:  # reported by the assertion below
                    answer["error"] = error

            waiting = threading.Thread(target=call)
            waiting.start()
            # ...which is the restarted one, on the same port.
            servers.append(_serve(env))
            waiting.join(240)
            assert not waiting.is_alive() and "error" not in answer, answer
            assert answer["text"] and answer["stream"].finish_reason == "length"
            assert answer["stream"].usage.completion_tokens == 8
            # The channel whose stream broke carries further calls.
            assert client.models()[0].name == "noise"
            assert client.caption(image, max_new_tokens=4).result()
        servers[1].send_signal(signal.SIGTERM)
        assert servers[1].wait(30) == 0
        assert "Traceback" not in servers[1].stderr.read()
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
            server.wait()
