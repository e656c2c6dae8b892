"""``python -m tests.fake_server [--load-seconds S] [--hang] -- serve ARGS...``: the real ``vlm-service``
command line with the fake family registered, for tests that need a real server process (signals,
exit codes) without a real model. ``--model fake=DIR`` serves it (DIR from :func:`tests.fakes.register`).

- ``--load-seconds S``: loading takes S seconds (in small sleeps, like a real load).
- ``--hang``: every generation but the warm-up waits forever (a stuck model).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from tests import fakes
from vlm_service.cli import main


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--checkpoint-parent", type=Path, required=True)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    fakes.register(args.checkpoint_parent)
    if args.hang:
        generate = fakes.FakeBackend.generate

        def hanging_generate(self, request, out):
            if request.request_id != "warmup":
                threading.Event().wait()  # never returns
            return generate(self, request, out)

        fakes.FakeBackend.generate = hanging_generate
    if args.load_seconds:
        original = fakes.FakeBackend.load

        def slow_load(self) -> None:
            deadline = time.monotonic() + args.load_seconds
            while time.monotonic() < deadline:
                time.sleep(0.05)
            original(self)

        fakes.FakeBackend.load = slow_load
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return main(rest)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
