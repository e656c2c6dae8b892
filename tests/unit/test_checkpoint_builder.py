"""The checkpoint cache: keys made of what a build depends on, shipped copies, builds in a child process.

The key tests edit real copies of the source files and compute the key in a fresh interpreter, as a
developer's edit would be seen; the build tests run real builds (small ones) through ``build_cached``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.unit.checkpoint_builds import fail, train_a_little, wait_forever, write_pid
from vlm_service.checkpoints import builder
from vlm_service.checkpoints.builder import BuildFailed, BuildInputs, build_cached, fresh_builds

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vlm_service"

# Computes the keys from each copy of the package in turn, importing it afresh (transformers, the
# slow import, is shared); prints {variant: {checkpoint: record}}.
KEY_SCRIPT = """
import importlib, json, sys
out = {}
for variant, root in json.loads(sys.argv[1]).items():
    for name in [name for name in sys.modules if name == "vlm_service" or name.startswith("vlm_service.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    import vlm_service
    assert vlm_service.__file__.startswith(root), vlm_service.__file__
    import functools
    from vlm_service.checkpoints import builder, smolvlm_256m_shapes, tiny_moondream, tiny_qwen2_vl, tiny_smolvlm
    out[variant] = {
        "smolvlm": tiny_smolvlm.build_inputs(True).record(),
        "smolvlm-random": tiny_smolvlm.build_inputs(False).record(),
        "qwen2-vl": tiny_qwen2_vl.build_inputs(True).record(),
        "qwen2-vl-random": tiny_qwen2_vl.build_inputs(False).record(),
        # The builds that declare nothing: every module of the checkpoints package counts.
        "moondream": builder.default_inputs(tiny_moondream._build).record(),
        "moondream-random": builder.default_inputs(functools.partial(tiny_moondream._build, trained=False)).record(),
        "smolvlm-256m-shapes": builder.default_inputs(smolvlm_256m_shapes._build).record(),
    }
    sys.path.remove(root)
print(json.dumps(out))
"""

#: Edits of real source files: relative path -> (old text, new text).
VARIANTS = {
    "unedited": {},
    # A backend refactor: the same prompt built through a new helper, comments and docstrings.
    "refactor": {
        "backends/smolvlm.py": (
            "    def prompt(self, request: GenerationRequest) -> str:\n"
            "        text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]\n",
            "    def _instruction(self, request: GenerationRequest) -> str:\n"
            "        if request.task is Task.QUERY:\n"
            "            return request.question\n"
            "        return CAPTION_PROMPTS[request.length]\n\n"
            "    def prompt(self, request: GenerationRequest) -> str:\n"
            "        text = self._instruction(request)\n",
        ),
        "backends/hf.py": ("logger = logging.getLogger(__name__)", "logger = logging.getLogger(__name__)  # edited"),
        "backends/qwen2_vl.py": ('"""Qwen2-VL and Qwen2.5-VL', '"""Qwen2-VL and Qwen2.5-VL (edited)'),
        "backends/base.py": ('"""The backend base class', '"""The backend base class (edited)'),
        "types.py": ("from __future__ import annotations", "from __future__ import annotations  # edited"),
        "scheduler.py": ("from __future__ import annotations", "from __future__ import annotations  # edited"),
        "backends/decode_batch.py": ("import secrets", "import secrets  # edited"),
        "backends/moondream.py": ("import secrets", "import secrets  # edited"),
        "backends/remote_code.py": ("import hashlib", "import hashlib  # edited"),
    },
    "caption": {
        "backends/smolvlm.py": ('CaptionLength.NORMAL: "Describe this image."', 'CaptionLength.NORMAL: "Describe it."')
    },
    "recipe": {
        "checkpoints/tiny_smolvlm.py": ('"lr": 3e-3}', '"lr": 2e-3}'),
        "checkpoints/train.py": ("batch_size: int = 16,", "batch_size: int = 8,"),
    },
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """The cache keys a fresh interpreter computes from copies of the package with each variant's edits."""
    roots = {}
    for variant, edits in VARIANTS.items():
        root = tmp_path_factory.mktemp(variant)
        shutil.copytree(PACKAGE, root / "vlm_service", ignore=shutil.ignore_patterns("__pycache__", "shipped"))
        for relative, (old, new) in edits.items():
            path = root / "vlm_service" / relative
            text = path.read_text()
            assert old in text, f"{relative} no longer contains {old!r}"
            path.write_text(text.replace(old, new, 1))
        roots[variant] = str(root)
    result = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, json.dumps(roots)],
        cwd=tmp_path_factory.getbasetemp(),
        env={**os.environ, "PYTHONPATH": str(ROOT / "clients")},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_key_is_what_the_installed_code_gives(keys):
    from vlm_service.checkpoints import tiny_qwen2_vl, tiny_smolvlm

    baseline = keys["unedited"]
    assert baseline["smolvlm"] == tiny_smolvlm.build_inputs(True).record()
    assert baseline["qwen2-vl"] == tiny_qwen2_vl.build_inputs(True).record()
    assert set(baseline["smolvlm"]["parts"]) == {
        "probe",
        "recipe",
        *(
            f"source:vlm_service.checkpoints.{name}"
            for name in ("tiny_smolvlm", "tokenizer", "corpus", "shapes", "train")
        ),
    }
    # The random-weights twin is not trained: no recipe, no probe, no training code.
    assert set(baseline["smolvlm-random"]["parts"]) == {
        f"source:vlm_service.checkpoints.{name}" for name in ("tiny_smolvlm", "tokenizer", "corpus", "shapes")
    }


def test_a_backend_refactor_that_keeps_prompts_and_encodings_keeps_every_key(keys):
    assert keys["refactor"] == keys["unedited"]


def changed_parts(keys, variant: str, checkpoint: str) -> set[str]:
    before, after = keys["unedited"][checkpoint]["parts"], keys[variant][checkpoint]["parts"]
    return {part for part in before if before[part] != after[part]}


def test_changing_a_caption_instruction_changes_the_key_of_what_is_trained_with_it(keys):
    assert keys["caption"]["smolvlm"]["key"] != keys["unedited"]["smolvlm"]["key"]
    assert changed_parts(keys, "caption", "smolvlm") == {"probe"}
    # Neither the untrained twin nor the other family is trained through that prompt.
    assert keys["caption"]["smolvlm-random"] == keys["unedited"]["smolvlm-random"]
    assert keys["caption"]["qwen2-vl"] == keys["unedited"]["qwen2-vl"]


def test_changing_the_recipe_or_the_training_code_changes_the_key(keys):
    train = "source:vlm_service.checkpoints.train"
    assert changed_parts(keys, "recipe", "smolvlm") == {"recipe", train, "source:vlm_service.checkpoints.tiny_smolvlm"}
    assert changed_parts(keys, "recipe", "qwen2-vl") == {train}
    for checkpoint in ("smolvlm", "qwen2-vl"):
        assert keys["recipe"][checkpoint]["key"] != keys["unedited"][checkpoint]["key"]
    # The untrained twin is built by the edited module too, but not by the training code.
    assert changed_parts(keys, "recipe", "smolvlm-random") == {"source:vlm_service.checkpoints.tiny_smolvlm"}


# --- builds: in a child process, cached, shipped -------------------------------------------------


INPUTS = BuildInputs(sources=("vlm_service.checkpoints.corpus",), recipe={"steps": 1})


def test_a_build_runs_in_a_child_process_and_leaves_the_callers_torch_state_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    path = build_cached(tmp_path, "trained", train_a_little, inputs=INPUTS)
    assert json.loads((path / "config.json").read_text())["pid"] != os.getpid()
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected_next), "the build reseeded the caller's global generator"
    # Cached: the second call builds nothing.
    assert build_cached(tmp_path, "trained", fail, inputs=INPUTS) == path
    assert json.loads((path / builder.INPUTS_FILE).read_text()) == INPUTS.record()


def test_a_failed_build_raises_with_the_childs_traceback_and_leaves_nothing(tmp_path):
    with pytest.raises(BuildFailed, match="the recipe is broken") as info:
        build_cached(tmp_path, "broken", fail, inputs=INPUTS)
    assert "RuntimeError" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    directory = tmp_path / "shipped"
    monkeypatch.setattr(builder, "SHIPPED_DIR", directory)
    return directory


def ship(shipped: Path, name: str, record: dict) -> Path:
    directory = shipped / name
    directory.mkdir(parents=True)
    write_pid(directory, "shipped")
    (directory / builder.INPUTS_FILE).write_text(json.dumps(record))
    return directory


def test_a_current_shipped_copy_is_served_without_a_build(tmp_path, shipped):
    copy = ship(shipped, "model", INPUTS.record())
    cache = tmp_path / "cache"
    assert build_cached(cache, "model", fail, inputs=INPUTS) == copy
    assert not cache.exists()
    # `vlm-service build` rebuilds from the code instead.
    with fresh_builds():
        built = build_cached(cache, "model", write_pid, inputs=INPUTS)
    assert built.parent == cache and json.loads((built / "config.json").read_text())["recipe"] == ""


def test_a_stale_shipped_copy_is_rebuilt_with_a_log_line(tmp_path, shipped, caplog):
    stale = BuildInputs(sources=INPUTS.sources, recipe={"steps": 2})
    ship(shipped, "model", stale.record())
    with caplog.at_level(logging.WARNING, logger=builder.__name__):
        built = build_cached(tmp_path / "cache", "model", write_pid, inputs=INPUTS)
    assert built == tmp_path / "cache" / f"model-{INPUTS.key}"
    assert json.loads((built / "config.json").read_text())["recipe"] == ""
    (line,) = [r.getMessage() for r in caplog.records if "shipped" in r.getMessage()]
    assert "stale" in line and stale.key in line and INPUTS.key in line and "changed: recipe" in line


def test_the_shipped_checkpoint_is_package_data_and_goes_into_the_docker_image():
    import fnmatch
    import tomllib

    shipped = builder.SHIPPED_DIR / "tiny-smolvlm"
    assert shipped.is_dir(), "no shipped tiny-smolvlm: run `make ship` and commit vlm_service/checkpoints/shipped/"
    files = list(shipped.iterdir())
    assert {"config.json", "model.safetensors", builder.INPUTS_FILE} <= {path.name for path in files}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["vlm_service.checkpoints"]
    package = PACKAGE / "checkpoints"
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), f"{relative} is not package data"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY vlm_service ./vlm_service" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        assert not any(fnmatch.fnmatch(relative, pattern) for pattern in ignored), f".dockerignore drops {relative}"


def test_stopping_builds_ends_a_running_one_at_once(tmp_path):
    import threading

    outcome = []

    def build():
        try:
            build_cached(tmp_path, "endless", wait_forever, inputs=INPUTS)
        except BuildFailed as exc:
            outcome.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    started = tmp_path / "started"
    while not started.exists():  # written by the child once it runs the build
        assert thread.is_alive(), outcome
        time.sleep(0.05)
    assert builder.stop_builds() == 1
    thread.join(10)
    assert not thread.is_alive(), "the caller still waits on a stopped build"
    assert "exit code -15" in str(outcome[0])
    assert not (tmp_path / f"endless-{INPUTS.key}").exists()
