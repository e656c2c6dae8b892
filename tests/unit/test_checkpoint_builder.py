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
from vlm_checkpoints import builder
from vlm_checkpoints.builder import BuildFailed, BuildInputs, build_cached, fresh_builds

ROOT = Path(__file__).resolve().parents[2]
#: The runtime and the checkpoint builders, copied whole for each variant.
PACKAGES = ("vlm_service", "vlm_checkpoints")

# Computes the keys from each copy of the packages in turn, importing them afresh (transformers, the
# slow import, is shared); prints {variant: {checkpoint: record}}. Every built-in checkpoint's inputs,
# as its ensure_* function declares them.
KEY_SCRIPT = """
import functools, importlib, json, sys
out = {}
for variant, (root, package) in json.loads(sys.argv[1]).items():
    for name in [name for name in sys.modules if name.partition(".")[0] in ("vlm_service", package)]:
        del sys.modules[name]
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    builder, tiny_smolvlm, tiny_qwen2_vl, tiny_moondream, smolvlm_256m, qwen2_vl_2b, moondream2 = (
        importlib.import_module(f"{package}.{name}")
        for name in ("builder", "tiny_smolvlm", "tiny_qwen2_vl", "tiny_moondream", "smolvlm_256m_shapes",
                     "qwen2_vl_2b_shapes", "moondream2_shapes")
    )
    import vlm_service
    for module in (vlm_service, builder):
        assert module.__file__.startswith(root), module.__file__
    out[variant] = {
        "smolvlm": tiny_smolvlm.build_inputs(True).record(),
        "smolvlm-random": tiny_smolvlm.build_inputs(False).record(),
        "qwen2-vl": tiny_qwen2_vl.build_inputs(True).record(),
        "qwen2-vl-random": tiny_qwen2_vl.build_inputs(False).record(),
        # The builds that declare nothing: every module of the checkpoints package counts.
        "moondream": builder.default_inputs(tiny_moondream._build).record(),
        "moondream-random": builder.default_inputs(functools.partial(tiny_moondream._build, trained=False)).record(),
        "smolvlm-256m-shapes": builder.default_inputs(smolvlm_256m._build).record(),
        "qwen2-vl-2b-shapes": builder.default_inputs(qwen2_vl_2b._build).record(),
        "moondream2-shapes": builder.default_inputs(moondream2._build).record(),
    }
    sys.path.remove(root)
print(json.dumps(out))
"""

#: Edits of real source files: path from the repository's root -> (old text, new text).
VARIANTS = {
    "unedited": {},
    # A backend refactor: the same prompt built through a new helper, comments and docstrings.
    "refactor": {
        "vlm_service/backends/smolvlm.py": (
            "    def prompt(self, request: GenerationRequest) -> str:\n"
            "        text = request.question if request.task is Task.QUERY else CAPTION_PROMPTS[request.length]\n",
            "    def _instruction(self, request: GenerationRequest) -> str:\n"
            "        if request.task is Task.QUERY:\n"
            "            return request.question\n"
            "        return CAPTION_PROMPTS[request.length]\n\n"
            "    def prompt(self, request: GenerationRequest) -> str:\n"
            "        text = self._instruction(request)\n",
        ),
        "vlm_service/backends/hf.py": (
            "logger = logging.getLogger(__name__)",
            "logger = logging.getLogger(__name__)  # edited",
        ),
        "vlm_service/backends/qwen2_vl.py": ('"""Qwen2-VL and Qwen2.5-VL', '"""Qwen2-VL and Qwen2.5-VL (edited)'),
        "vlm_service/backends/base.py": ('"""The backend base class', '"""The backend base class (edited)'),
        "vlm_service/types.py": ("from __future__ import annotations", "from __future__ import annotations  # edited"),
        "vlm_service/core/scheduler.py": (
            "from __future__ import annotations",
            "from __future__ import annotations  # edited",
        ),
        "vlm_service/backends/decode_batch.py": ("import secrets", "import secrets  # edited"),
        "vlm_service/backends/moondream.py": ("import secrets", "import secrets  # edited"),
        "vlm_service/backends/remote_code.py": ("import hashlib", "import hashlib  # edited"),
    },
    "caption": {
        "vlm_service/backends/smolvlm.py": (
            'CaptionLength.NORMAL: "Describe this image."',
            'CaptionLength.NORMAL: "Describe it."',
        )
    },
    "recipe": {
        "vlm_checkpoints/tiny_smolvlm.py": ('"lr": 3e-3}', '"lr": 2e-3}'),
        "vlm_checkpoints/train.py": ("batch_size: int = 16,", "batch_size: int = 8,"),
    },
    # The checkpoints package under another name (its modules import one another relatively).
    "renamed": {},
}
#: The name each variant's copy of vlm_checkpoints has.
RENAMED = {"renamed": "other_checkpoints"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """The cache keys a fresh interpreter computes from copies of the packages with each variant's edits."""
    roots = {}
    for variant, edits in VARIANTS.items():
        root = tmp_path_factory.mktemp(variant)
        for package in PACKAGES:
            shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "shipped"))
        for relative, (old, new) in edits.items():
            path = root / relative
            text = path.read_text()
            assert old in text, f"{relative} no longer contains {old!r}"
            path.write_text(text.replace(old, new, 1))
        package = RENAMED.get(variant, "vlm_checkpoints")
        if package != "vlm_checkpoints":
            (root / "vlm_checkpoints").rename(root / package)
        roots[variant] = (str(root), package)
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
    from vlm_checkpoints import tiny_qwen2_vl, tiny_smolvlm

    baseline = keys["unedited"]
    assert baseline["smolvlm"] == tiny_smolvlm.build_inputs(True).record()
    assert baseline["qwen2-vl"] == tiny_qwen2_vl.build_inputs(True).record()
    # Modules of the checkpoints package are named relative to it.
    assert set(baseline["smolvlm"]["parts"]) == {
        "probe",
        "recipe",
        *(f"source:.{name}" for name in ("tiny_smolvlm", "tokenizer", "corpus", "shapes", "train")),
    }
    # The random-weights twin is not trained: no recipe, no probe, no training code.
    assert set(baseline["smolvlm-random"]["parts"]) == {
        f"source:.{name}" for name in ("tiny_smolvlm", "tokenizer", "corpus", "shapes")
    }


def test_a_backend_refactor_that_keeps_prompts_and_encodings_keeps_every_key(keys):
    assert keys["refactor"] == keys["unedited"]
    # Every source of every built-in checkpoint is a module of the checkpoints package, none of the runtime.
    for checkpoint, record in keys["unedited"].items():
        sources = [part for part in record["parts"] if part.startswith("source:")]
        assert sources and all(part.startswith("source:.") for part in sources), (checkpoint, sources)


def test_the_keys_do_not_depend_on_the_name_of_the_checkpoints_package(keys):
    assert keys["renamed"] == keys["unedited"]


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
    train = "source:.train"
    assert changed_parts(keys, "recipe", "smolvlm") == {"recipe", train, "source:.tiny_smolvlm"}
    assert changed_parts(keys, "recipe", "qwen2-vl") == {train}
    for checkpoint in ("smolvlm", "qwen2-vl"):
        assert keys["recipe"][checkpoint]["key"] != keys["unedited"][checkpoint]["key"]
    # The untrained twin is built by the edited module too, but not by the training code.
    assert changed_parts(keys, "recipe", "smolvlm-random") == {"source:.tiny_smolvlm"}


# --- builds: in a child process, cached, shipped -------------------------------------------------


INPUTS = BuildInputs(sources=("vlm_checkpoints.corpus",), recipe={"steps": 1})


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
    assert shipped.is_dir(), "no shipped tiny-smolvlm: run `make ship` and commit vlm_checkpoints/shipped/"
    files = list(shipped.iterdir())
    assert {"config.json", "model.safetensors", builder.INPUTS_FILE} <= {path.name for path in files}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"vlm_service", "vlm_checkpoints"} <= set(pyproject["tool"]["setuptools"]["packages"])
    patterns = pyproject["tool"]["setuptools"]["package-data"]["vlm_checkpoints"]
    package = ROOT / "vlm_checkpoints"
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), f"{relative} is not package data"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY vlm_service ./vlm_service" in dockerfile
    assert "COPY vlm_checkpoints ./vlm_checkpoints" in dockerfile
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


def test_the_server_finds_running_builds_by_the_builders_module_name(monkeypatch):
    """A shutdown stops builds through ``catalogue.stop_builds``, which looks the builder up in
    ``sys.modules`` by name (so as not to import it): that name is the builder's."""
    from vlm_service.backends import catalogue

    stopped = []
    monkeypatch.setattr(builder, "stop_builds", lambda: stopped.append(True) or 0)
    catalogue.stop_builds()
    assert stopped == [True]
