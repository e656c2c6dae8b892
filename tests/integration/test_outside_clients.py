"""Real outside clients: grpcurl through reflection, the vlm-client CLI, the Python client library,
and `vlm-service serve` as its own process (SIGTERM drains and exits 0)."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import png_bytes, shape_image
from vlm_client import AsyncVLMClient, InvalidArgument, ModelNotFound, VLMClient

BIN = Path(sys.executable).parent


def run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "red-circle.png"
    path.write_bytes(png_bytes(shape_image("red")))
    return path


def test_grpcurl_lists_and_describes_through_reflection(smolvlm_server):
    result = run([str(BIN / "grpcurl"), "-plaintext", smolvlm_server.target, "list"])
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {"vlm.v1.VisionLanguageService", "grpc.health.v1.Health"} <= services
    result = run(
        [str(BIN / "grpcurl"), "-plaintext", smolvlm_server.target, "describe", "vlm.v1.VisionLanguageService"]
    )
    assert "rpc Caption ( .vlm.v1.CaptionRequest ) returns ( stream .vlm.v1.CaptionResponse )" in result.stdout


def test_grpcurl_receives_a_streamed_caption(smolvlm_server, image_file):
    payload = json.dumps(
        {
            "image": {"data": base64.b64encode(image_file.read_bytes()).decode()},
            "model": "noise",
            "options": {"maxNewTokens": 12},
        }
    )
    result = run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", "@", smolvlm_server.target, "vlm.v1.VisionLanguageService/Caption"],
        input=payload,
    )
    assert result.returncode == 0, result.stderr
    decoder, text, messages = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    # Text, then the last message: how many text messages depends on how fast grpcurl reads (text that
    # piles up unread leaves together), so only the content and the end are asserted.
    assert len(messages) >= 2 and "".join(m.get("text", "") for m in messages)
    assert all(m.get("text") for m in messages[:-1])
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["completion_tokens"] == 12


def json_messages(text: str) -> list[dict]:
    """grpcurl's output: one pretty-printed JSON object per response message."""
    decoder, text, messages = json.JSONDecoder(), text.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    return messages


def test_grpcurl_drives_a_watch_stream(smolvlm_server, image_file):
    """Several JSON messages on stdin with -d @: the config, then frames; grpcurl half-closes at the end
    of its input and the server answers what is due, then ends the stream."""
    data = base64.b64encode(image_file.read_bytes()).decode()
    requests = [{"config": {"question": "What colour is the shape?", "policy": "WATCH_POLICY_LATEST"}}]
    requests += [{"frame": {"frame_id": frame_id, "image": {"data": data}}} for frame_id in (1, 2)]
    result = run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", "@", smolvlm_server.target, "vlm.v1.VisionLanguageService/Watch"],
        input="\n".join(json.dumps(r) for r in requests),
    )
    assert result.returncode == 0, result.stderr
    messages = json_messages(result.stdout)
    finals = [m for m in messages if "finish_reason" in m]
    assert finals[-1] is messages[-1] and finals[-1]["frame_id"] == "2", "the last frame is always answered"
    assert all(m["finish_reason"] == "FINISH_REASON_STOP" for m in finals)
    assert len(finals) + sum(m.get("frames_skipped", 0) for m in finals) == 2
    answer = "".join(m.get("text", "") for m in messages if m["frame_id"] == "2")
    assert answer == "The shape is red."


def test_grpcurl_health_check(smolvlm_server):
    result = run([str(BIN / "grpcurl"), "-plaintext", smolvlm_server.target, "grpc.health.v1.Health/Check"])
    assert json.loads(result.stdout)["status"] == "SERVING"


def test_cli_streams_a_caption_and_a_query(smolvlm_server, image_file):
    result = run(
        [
            str(BIN / "vlm-client"),
            "--server",
            smolvlm_server.target,
            "caption",
            str(image_file),
            "--model",
            "noise",
            "--max-new-tokens",
            "10",
            "--usage",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "finish_reason=length" in result.stderr and '"completion_tokens": 10' in result.stderr
    result = run(
        [
            str(BIN / "vlm-client"),
            "--server",
            smolvlm_server.target,
            "query",
            str(image_file),
            "What colour is the shape?",
            "--max-new-tokens",
            "5",
        ]
    )
    assert result.returncode == 0 and result.stdout.strip()
    result = run([str(BIN / "vlm-client"), "--server", smolvlm_server.target, "models"])
    assert result.stdout.startswith("tiny-smolvlm\tsmolvlm\tdefault ready")
    assert "\nnoise\tsmolvlm\tready" in result.stdout


def test_cli_reports_errors_without_traceback(smolvlm_server, image_file):
    result = run(
        [str(BIN / "vlm-client"), "--server", smolvlm_server.target, "caption", str(image_file), "--model", "nope"]
    )
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "Traceback" not in result.stderr


def test_cli_prints_text_as_it_arrives(smolvlm_server, image_file):
    """The CLI writes each chunk as it comes: the first text is readable before the answer ends."""
    process = subprocess.Popen(
        [
            str(BIN / "vlm-client"),
            "--server",
            smolvlm_server.target,
            "caption",
            str(image_file),
            "--model",
            "noise",
            "--max-new-tokens",
            "1500",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = process.stdout.read1(1)
        assert first, process.stderr.read().decode()
        assert process.poll() is None, "the first text must arrive before the stream ends"
    finally:
        process.kill()
        process.wait()


def test_cli_watch_prints_each_answer_as_it_streams(smolvlm_server, image_file, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("frame-1.png", "frame-2.png", "frame-3.png"):
        (frames / name).write_bytes(image_file.read_bytes())
    (frames / "notes.txt").write_text("not a frame")
    (tmp_path / "bad-1.png").write_bytes(b"not a picture")
    command = [str(BIN / "vlm-client"), "--server", smolvlm_server.target, "watch"]
    result = run([*command, str(frames), "--fps", "20", "--question", "What colour is the shape?", "--usage"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.endswith("] The shape is red.") for line in lines), result.stdout
    assert lines[-1] == "[2 frame-3.png] The shape is red.", "the last frame is always answered"
    usage = [line for line in result.stderr.splitlines() if line.startswith("frame=")]
    assert len(usage) == len(lines) and all("finish_reason=stop" in line for line in usage)
    skipped = sum(int(line.split("frames_skipped=")[1].split()[0]) for line in usage)
    assert len(lines) + skipped == 3, "every frame answered or counted as skipped"
    result = run([*command, str(tmp_path / "bad-*.png")])
    assert result.returncode == 0 and not result.stdout
    assert "vlm-client: frame 0 (bad-1.png): INVALID_ARGUMENT: frame.image.data" in result.stderr
    result = run([*command, str(frames), "--policy", "interrupt", "--model", "noise", "--max-new-tokens", "3"])
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("[2 frame-3.png] "), result.stderr
    result = run([*command, str(frames), "--model", "nope"])
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr and "Traceback" not in result.stderr


def test_python_client(smolvlm_server, image_file):
    with VLMClient(smolvlm_server.target, timeout=30) as client:
        from PIL import Image

        for image in (image_file, str(image_file), image_file.read_bytes(), Image.open(image_file)):
            stream = client.caption(image, model="noise", max_new_tokens=8, length="short")
            chunks = list(stream)
            assert chunks and all(chunks) and "".join(chunks) == stream.text
            assert stream.finish_reason == "length" and stream.usage.completion_tokens == 8
            assert stream.request_id
        answer = client.query(image_file, "What colour is the shape?", max_new_tokens=20)
        assert answer.result() == answer.text == "The shape is red."
        assert answer.finish_reason == "stop"
        info, _ = client.models()
        assert info.name == "tiny-smolvlm" and info.is_default and "short" in info.caption_lengths
        with pytest.raises(ModelNotFound):
            list(client.caption(image_file, model="nope"))
        with pytest.raises(InvalidArgument, match="options.top_p"):
            list(client.caption(image_file, top_p=3.0))


async def test_async_client(smolvlm_server, image_file):
    async with AsyncVLMClient(smolvlm_server.target, timeout=30) as client:
        stream = client.caption(image_file, model="noise", max_new_tokens=9)
        chunks = [chunk async for chunk in stream]
        assert "".join(chunks) == stream.text and stream.usage.completion_tokens == 9
        assert (await client.query(image_file, "Shape?", max_new_tokens=4).result()) != ""
        assert (await client.models())[0].ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(target: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server never became SERVING")


def serve_noise(cache_dir, noise_dir, grace_period: float) -> tuple[subprocess.Popen, str]:
    """A `vlm-service serve` process of the noise model on a free loopback port: (process, target)."""
    port = free_port()
    env = {
        **os.environ,
        "VLM_CACHE_DIR": str(cache_dir),
        "VLM_PORT": str(port),
        "VLM_HOST": "127.0.0.1",
        "VLM_GRACE_PERIOD": str(grace_period),
        "VLM_MODELS": f"noise={noise_dir}",
    }
    server = subprocess.Popen(
        [str(BIN / "vlm-service"), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return server, f"127.0.0.1:{port}"


def test_serve_process_drains_on_sigterm_and_exits_zero(cache_dir, noise_dir, image_file):
    server, target = serve_noise(cache_dir, noise_dir, grace_period=20)
    try:
        wait_serving(target)
        health = run([str(BIN / "vlm-service"), "health", "--server", target])
        assert health.returncode == 0 and health.stdout.strip() == "SERVING"
        with VLMClient(target) as client:
            stream = client.caption(image_file, max_new_tokens=300)
            chunks = iter(stream)
            first = next(chunks)
            server.send_signal(signal.SIGTERM)  # mid-stream
            rest = list(chunks)
        assert first and stream.finish_reason == "length", "the in-flight stream finishes within the grace period"
        assert stream.usage.completion_tokens == 300 and rest, "the stream went on after SIGTERM"
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert "Traceback" not in server.stderr.read()


def test_sigterm_with_an_open_watch_stream_ends_it_with_unavailable_at_its_next_frame_and_exits_zero(
    cache_dir, noise_dir
):
    """A Watch stream is open (a frame answered, the client idle between frames) when SIGTERM comes: the
    drain does not wait for the grace period on it; its next frame ends it with UNAVAILABLE (the client
    reconnects elsewhere), and the process exits 0."""
    import queue

    from vlm.v1 import vlm_service_pb2 as pb
    from vlm.v1 import vlm_service_pb2_grpc as pb_grpc

    server, target = serve_noise(cache_dir, noise_dir, grace_period=60)
    frames: queue.Queue = queue.Queue()

    def requests():
        while (message := frames.get()) is not None:
            yield message

    picture = pb.Image(data=png_bytes(shape_image("red")))
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as channel:
            frames.put(pb.WatchRequest(config=pb.WatchConfig(options=pb.GenerationOptions(max_new_tokens=4))))
            frames.put(pb.WatchRequest(frame=pb.Frame(frame_id=1, image=picture)))
            stream = pb_grpc.VisionLanguageServiceStub(channel).Watch(requests(), timeout=120)
            answer = []
            for message in stream:
                answer.append(message)
                if message.finish_reason:
                    break
            assert answer[-1].frame_id == 1 and answer[-1].usage.completion_tokens == 4
            server.send_signal(signal.SIGTERM)  # the stream is open and idle
            # A frame sent before the signal is handled is still answered; the first one after it ends
            # the stream. (Health cannot tell when: a draining server takes no new RPC, health's either.)
            frames.put(pb.WatchRequest(frame=pb.Frame(frame_id=2, image=picture)))
            answered = []
            with pytest.raises(grpc.RpcError) as ended:
                for message in stream:
                    assert not message.HasField("error"), message
                    if message.finish_reason:
                        answered.append(message.frame_id)
                        assert len(answered) < 50, "the drain never reached the stream"
                        frames.put(pb.WatchRequest(frame=pb.Frame(frame_id=3 + len(answered), image=picture)))
            frames.put(None)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
        assert server.wait(30) == 0, "the drain ended with the stream, well before the 60 s grace period"
    finally:
        frames.put(None)
        if server.poll() is None:
            server.kill()
        server.wait()
    assert "Traceback" not in server.stderr.read()


def test_serve_rejects_bad_configuration_before_binding():
    result = run([str(BIN / "vlm-service"), "serve", "--model", "no-such-builtin"])
    assert result.returncode == 2
    assert "unknown built-in name" in result.stderr and "Traceback" not in result.stderr
    result = run([str(BIN / "vlm-service"), "serve", "--max-queue", "0"])
    assert result.returncode == 2 and "--max-queue ($VLM_MAX_QUEUE)" in result.stderr


def test_build_command_builds_the_tiny_checkpoints_the_server_serves(cache_dir, tiny_smolvlm_dir, noise_dir):
    """`vlm-service build` (what `make checkpoints` runs) puts each checkpoint where the server and the
    tests look for it, and names what it cannot build."""
    result = run([str(BIN / "vlm-service"), "build", "tiny-smolvlm", "--random-twins", "--cache-dir", str(cache_dir)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"tiny-smolvlm: {tiny_smolvlm_dir} (")
    assert lines[1].startswith(f"tiny-smolvlm (random weights): {noise_dir} (")
    result = run([str(BIN / "vlm-service"), "build", "smolvlm"])
    assert result.returncode == 2 and "not a buildable built-in" in result.stderr
    assert "tiny-qwen2-vl" in result.stderr and "Traceback" not in result.stderr


def test_grpcurl_streams_detected_boxes(families_server):
    """The docs' grpcurl Detect (docs/grounding.md): one message per box, then the end."""
    from vlm_checkpoints import shapes

    scene = shapes.Scene("red", "circle", "white")
    image, truth = shapes.draw_placed(scene, random.Random(3))
    payload = json.dumps(
        {"model": "tiny-moondream", "image": {"data": base64.b64encode(png_bytes(image)).decode()}, "object": "circle"}
    )
    result = run(
        [str(BIN / "grpcurl"), "-plaintext", "-d", "@", families_server.target, "vlm.v1.VisionLanguageService/Detect"],
        input=payload,
    )
    assert result.returncode == 0, result.stderr
    messages = json_messages(result.stdout)
    boxes = [m["box"] for m in messages if "box" in m]
    corners = ("x_min", "y_min", "x_max", "y_max")  # a 0.0 is left out of proto3 JSON
    assert boxes and all(set(box) <= set(corners) for box in boxes), result.stdout
    assert shapes.iou(tuple(boxes[0].get(k, 0.0) for k in corners), truth) >= 0.5
    assert messages[-1]["finish_reason"] == "FINISH_REASON_STOP" and "usage" in messages[-1]
