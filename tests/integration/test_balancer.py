"""A real gRPC-aware balancer: nginx (Debian's package, `grpc_pass`) running deploy/nginx/nginx.conf in
front of three real `vlm-service serve` processes on loopback.

Two replicas serve the model `smolvlm` and one serves `qwen2-vl`, as in the config's example; the
test only swaps the example's ports for free ones. All three run one cheap checkpoint (the tiny
SmolVLM with random weights, so every answer runs to its token budget) under those names: what is
tested is where calls go, and each replica answers only for the name it serves. Calls are counted by each replica itself (its Prometheus
`vlm_requests_total`), and nginx's access log says which client connection each call came on.

nginx must be installed (`make test` installs it where it runs as root, or says what to install): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import caption_request
from vlm.v1 import vlm_service_pb2 as pb
from vlm.v1 import vlm_service_pb2_grpc as pb_grpc
from vlm_service.server import model_health_name

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
# The addresses in deploy/nginx/nginx.conf, and what stands at each in this test.
EXAMPLE_LISTEN = "127.0.0.1:50051"
EXAMPLE_REPLICAS = {"a": "127.0.0.1:50061", "b": "127.0.0.1:50062", "c": "127.0.0.1:50063"}
# The drain test's channel carries the client library's retry policy (vlm_client.RETRY_POLICY): UNAVAILABLE,
# and CANCELLED before anything was received, which gRPC's server core answers to a call that reaches
# the replica in the instant its shutdown starts (nginx sent it before reading the replica's GOAWAY).
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "vlm.v1.VisionLanguageService"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nginx_binary() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail("nginx is not installed: `apt-get install nginx-light` (Debian); `make test` installs it as root")
    return path


@dataclass
class Replica:
    """One `vlm-service serve` process on 127.0.0.1, with its metrics endpoint."""

    name: str
    model: str
    source: Path
    log: Path
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    target: str = ""

    def start(self, cache_dir: Path) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLM_CACHE_DIR=str(cache_dir))
        self.process = subprocess.Popen(
            [
                str(BIN / "vlm-service"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                f"{self.model}={self.source}",
                "--metrics-port",
                str(self.metrics_port),
                "--grace-period",
                "10",
                "--torch-threads",
                "1",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
        )

    def wait_listening(self) -> None:
        line = self.process.stdout.readline()  # printed once the port is bound, before the model loads
        match = re.search(r"listening on (\S+:\d+)", line)
        assert match, f"replica {self.name} did not start: {line!r}\n{self.log.read_text()[-2000:]}"
        self.target = match.group(1)

    def wait_serving(self, timeout: float = 120) -> None:
        """Follow the replica's health for its model (Health/Watch) until it is SERVING."""
        with grpc.insecure_channel(self.target) as channel:
            request = health_pb2.HealthCheckRequest(service=model_health_name(self.model))
            try:
                for reply in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=timeout):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError as exc:
                pytest.fail(f"replica {self.name} never served: {exc.code().name}\n{self.log.read_text()[-2000:]}")

    def ok_calls(self) -> int:
        """Caption and Query RPCs this replica finished OK, from its own metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return int(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "vlm_requests_total" and sample.labels.get("code") == "OK"
            )
        )

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@dataclass
class Balancer:
    target: str
    access_log: Path
    replicas: dict[str, Replica]

    def ok_calls(self) -> dict[str, int]:
        return {name: replica.ok_calls() for name, replica in self.replicas.items() if replica.process.poll() is None}

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines()

    def wait_for_log(self, start: int, method: str, count: int, timeout: float = 10) -> list[str]:
        """nginx writes a call's line as it finishes the call, which may be just after the client saw
        its end: wait (bounded) until ``count`` lines for ``method`` follow line ``start``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_lines()[start:] if f"/{method} " in line]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)


@pytest.fixture(scope="module")
def balancer(tmp_path_factory, cache_dir, noise_dir):
    nginx = nginx_binary()
    work = tmp_path_factory.mktemp("balancer")
    sources = {
        "a": ("smolvlm", noise_dir),
        "b": ("smolvlm", noise_dir),
        "c": ("qwen2-vl", noise_dir),
    }
    replicas = {
        name: Replica(name, model, source, work / f"replica-{name}.log") for name, (model, source) in sources.items()
    }
    nginx_process = None
    try:
        for replica in replicas.values():
            replica.start(cache_dir)
        for replica in replicas.values():
            replica.wait_listening()
        conf = NGINX_CONF.read_text()
        listen = f"127.0.0.1:{free_port()}"
        for example, actual in [(EXAMPLE_LISTEN, listen)] + [
            (EXAMPLE_REPLICAS[n], r.target) for n, r in replicas.items()
        ]:
            assert conf.count(example) == 1, f"{NGINX_CONF} should name {example} once (the docs' example)"
            conf = conf.replace(example, actual)
        (work / "nginx.conf").write_text(conf)
        nginx_process = subprocess.Popen(
            [nginx, "-p", f"{work}/", "-c", str(work / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(work / "nginx-error.log").open("w"),
        )
        for replica in replicas.values():
            replica.wait_serving()
        with grpc.insecure_channel(listen) as channel:  # nginx answers (health goes to a smolvlm replica)
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=20, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                pytest.fail(f"nginx did not answer: {exc.code().name}\n{(work / 'nginx-error.log').read_text()}")
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        yield Balancer(listen, work / "access.log", replicas)
    finally:
        if nginx_process is not None:
            nginx_process.terminate()
            nginx_process.wait(10)
        for replica in replicas.values():
            replica.terminate()
        for replica in replicas.values():
            replica.wait_stopped()


def caption(stub, model: str = "", metadata=(), max_new_tokens: int = 6) -> list[pb.CaptionResponse]:
    return list(
        stub.Caption(caption_request(model=model, max_new_tokens=max_new_tokens), metadata=metadata, timeout=60)
    )


def test_the_docs_example_serves_the_replicas_this_config_names():
    """The nginx example of docs/operations.md starts the replicas this config sends calls to (each on
    its port, with the model the config routes to it), runs this very file, and calls through it."""
    page = (ROOT / "docs" / "operations.md").read_text()
    section = page[page.index("### nginx in front of replicas") :]
    example = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    conf = NGINX_CONF.read_text()
    routes = dict(re.findall(r"^\s+([a-z0-9-]+)\s+([a-z0-9_]+);$", conf[conf.index("map $http_x_vlm_model") :], re.M))
    served = 0
    for upstream, body in re.findall(r"upstream (\w+) \{(.*?)\}", conf, re.S):
        (model,) = {model for model, target in routes.items() if target == upstream and model != "default"}
        for address in re.findall(r"server (\S+) ", body):
            assert address in EXAMPLE_REPLICAS.values()
            port = address.rsplit(":", 1)[1]
            assert f"vlm-service serve --port {port} --model {model} &" in example, f"no {model} replica on {port}"
            served += 1
    assert served == len(EXAMPLE_REPLICAS)
    assert f'-c "$PWD/{NGINX_CONF.relative_to(ROOT)}"' in example
    assert f"--server localhost:{EXAMPLE_LISTEN.rsplit(':', 1)[1]}" in example


def test_one_connection_spreads_its_calls_over_the_replicas(balancer):
    before, lines_before = balancer.ok_calls(), len(balancer.log_lines())
    with grpc.insecure_channel(balancer.target) as channel:
        stub = pb_grpc.VisionLanguageServiceStub(channel)
        for _ in range(12):
            assert caption(stub)[-1].usage.completion_tokens == 6
    after = balancer.ok_calls()
    served = {name: after[name] - before[name] for name in after}
    print(f"12 calls on one connection, per replica: {served}")
    assert served["a"] + served["b"] == 12 and served["c"] == 0
    assert abs(served["a"] - served["b"]) <= 1, f"calls were not balanced per call: {served}"
    # nginx saw one client connection for all of them: the spread is per call, not per connection.
    lines = balancer.wait_for_log(lines_before, "Caption", 12)
    connections = {re.search(r"conn=(\d+)", line).group(1) for line in lines}
    assert len(lines) == 12 and len(connections) == 1, lines


def test_the_model_header_routes_to_the_replicas_of_that_model(balancer):
    header = (("x-vlm-model", "qwen2-vl"),)
    before = balancer.ok_calls()
    with grpc.insecure_channel(balancer.target) as channel:
        stub = pb_grpc.VisionLanguageServiceStub(channel)
        for _ in range(4):
            assert caption(stub, model="qwen2-vl", metadata=header)[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        (info,) = stub.ListModels(pb.ListModelsRequest(), metadata=header, timeout=10).models
        assert info.name == "qwen2-vl"
        # Without the header the call goes to the default model's replicas, which do not serve it.
        with pytest.raises(grpc.RpcError) as info:
            caption(stub, model="qwen2-vl")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == ["smolvlm"]
    after = balancer.ok_calls()
    assert {name: after[name] - before[name] for name in after} == {"a": 0, "b": 0, "c": 4}


@dataclass
class Load:
    """Client threads that stream captions through the balancer until told to stop."""

    target: str
    threads: int = 4
    done: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each OK call
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self):
        options = [("grpc.service_config", RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        self._channel = grpc.insecure_channel(self.target, options=options)
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def _run(self) -> None:
        stub = pb_grpc.VisionLanguageServiceStub(self._channel)
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                replies = caption(stub, max_new_tokens=24)
            except grpc.RpcError as exc:
                failure = f"{exc.code().name}: {exc.details()}"
            else:
                tokens = replies[-1].usage.completion_tokens
                failure = None if tokens == 24 else f"OK with {tokens} tokens, not 24"
            with self._progress:  # recorded here, checked by the test (an assert in this thread would be lost)
                if failure is None:
                    self.done.append((start, time.monotonic()))
                else:
                    self.failed.append(failure)
                self._progress.notify_all()

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def wait_for(self, calls: int, after: float = 0.0, timeout: float = 60) -> None:
        """Wait until ``calls`` calls that started after ``after`` (monotonic) have finished OK.
        A failed call ends the wait early; the caller checks ``failed``."""
        with self._progress:
            ok = self._progress.wait_for(lambda: sum(s > after for s, _ in self.done) >= calls or self.failed, timeout)
        assert ok, f"load stalled: {calls} calls did not finish in {timeout} s"

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)
        self._channel.close()


def test_draining_a_replica_under_load_fails_no_call(balancer):
    """SIGTERM to one `smolvlm` replica while four clients stream through nginx: the replica drains
    (its open streams finish, new calls get UNAVAILABLE, which the clients retry and nginx sends to the
    other replica; once it stops listening nginx skips it) and exits 0; no call fails."""
    draining, other = balancer.replicas["a"], balancer.replicas["b"]
    lines_before = len(balancer.log_lines())
    load = Load(balancer.target)
    load.start()
    try:
        load.wait_for(8)
        other_before = other.ok_calls()
        signalled = time.monotonic()
        draining.process.send_signal(signal.SIGTERM)
        assert draining.process.wait(30) == 0
        exited = time.monotonic()
        load.wait_for(8, after=exited)
    finally:
        load.stop()
    if load.failed:  # say which hop ended the call: nginx's record of it and the replicas' logs
        odd = [line for line in balancer.log_lines()[lines_before:] if 'grpc-status="0"' not in line]
        pytest.fail(
            f"calls failed during the drain: {load.failed}\nnginx lines not OK:\n"
            + "\n".join(odd)
            + f"\ndraining replica's log:\n{draining.log.read_text()[-4000:]}"
            + f"\nnginx errors:\n{(balancer.access_log.parent / 'nginx-error.log').read_text()[-4000:]}"
        )
    across = sum(start < signalled < end for start, end in load.done)
    refused = [
        line
        for line in balancer.log_lines()[lines_before:]
        if f"upstream={draining.target} " in line and 'grpc-status-header="14"' in line
    ]
    print(
        f"drain under load: {len(load.done)} calls OK, 0 failed; {across} were streaming when SIGTERM came; "
        f"{len(refused)} got UNAVAILABLE from the draining replica and were retried; "
        f"drain to exit {exited - signalled:.2f} s"
    )
    assert across >= 1, "no call was streaming when SIGTERM came: the drain under load was not tested"
    assert other.ok_calls() - other_before >= 8  # the rest went to the other replica
