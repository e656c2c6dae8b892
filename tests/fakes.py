"""A fake model family for servicer and engine tests: scripted text, observable, controllable.

It is registered like a real family (a registry line and a checkpoint directory whose config.json
names its architecture), so tests exercise the real registry, engine, scheduler and servicer.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from vlm_service.backends import registry
from vlm_service.backends.base import Backend, Outcome, TextSink
from vlm_service.types import FinishReason, GenerationRequest

ARCHITECTURE = "FakeVLMForTests"


class FakeBackend(Backend):
    """Writes ``pieces`` one per decode step. Class-level knobs let a test steer every instance."""

    family = "fake"
    languages = ("en", "ja")
    pieces: list[str] = ["Hello", ",", " wor", "ld", "."]
    load_gate: threading.Event | None = None  # load() waits for it
    load_gates: dict[str, threading.Event] = {}  # load() of the model of that name waits for it
    step_gate: threading.Event | None = None  # every step waits for it
    step_permits: threading.Semaphore | None = None  # every step takes one permit
    fail_next: BaseException | bool = False  # True: a RuntimeError; an exception: raise that one
    step_delay = 0.0  # seconds each decode step takes (sleeping, like a model releasing the GIL)
    instances: list[FakeBackend] = []

    def __init__(self, spec, runtime):
        super().__init__(spec, runtime)
        self.started: list[str] = []  # request ids in start order
        self.steps = 0
        FakeBackend.instances.append(self)

    device = "cpu"
    dtype = "float32"

    def load(self) -> None:
        if FakeBackend.load_gate is not None:
            FakeBackend.load_gate.wait(30)
        gate = FakeBackend.load_gates.get(self.spec.name)
        if gate is not None:
            gate.wait(30)

    def generate(self, request: GenerationRequest, out: TextSink) -> Outcome:
        if request.request_id != "warmup":
            self.started.append(request.request_id)
        if FakeBackend.fail_next and request.request_id != "warmup":
            error, FakeBackend.fail_next = FakeBackend.fail_next, False
            raise error if isinstance(error, BaseException) else RuntimeError("boom in /secret/path/model.py")
        produced = 0
        for piece in self.pieces[: request.params.max_new_tokens]:
            if FakeBackend.step_gate is not None:
                FakeBackend.step_gate.wait(30)
            if FakeBackend.step_permits is not None:
                FakeBackend.step_permits.acquire(timeout=30)
            if FakeBackend.step_delay:
                time.sleep(FakeBackend.step_delay)
            if out.should_stop():
                break
            self.steps += 1
            produced += 1
            out.add_text(piece)
        reason = FinishReason.STOP if produced == len(self.pieces) else FinishReason.LENGTH
        return Outcome(prompt_tokens=7, completion_tokens=produced, reason=reason)

    @classmethod
    def reset(cls) -> None:
        cls.pieces = ["Hello", ",", " wor", "ld", "."]
        cls.load_gate = None
        cls.load_gates = {}
        cls.step_gate = None
        cls.step_permits = None
        cls.fail_next = False
        cls.step_delay = 0.0
        cls.instances = []


def register(tmp_path: Path) -> Path:
    """Register the fake family and return a checkpoint directory that selects it."""
    registry.FAMILIES.setdefault("fake", ("tests.fakes", "FakeBackend"))
    registry.ARCHITECTURES.setdefault(ARCHITECTURE, "fake")
    checkpoint = tmp_path / "fake-checkpoint"
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text(json.dumps({"architectures": [ARCHITECTURE]}))
    return checkpoint
