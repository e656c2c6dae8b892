"""The import graph of the server's modules has no cycles, and the layering it promises holds.

The graph holds the runtime (``vlm_service/``) and the offline checkpoint builders (``vlm_checkpoints/``).
Every ``import`` statement in them counts, wherever it is: at module level, inside a function (a lazy
import), or under ``TYPE_CHECKING``. A cycle hidden behind a lazy or a type-only import is still two
modules that cannot be understood one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = "vlm_service"
CHECKPOINTS = "vlm_checkpoints"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in (RUNTIME, CHECKPOINTS) for path in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # `from . import convert`
    return {module for module in found if module in known and module != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_the_graph_is_read_whole():
    edges = graph()
    # A sample of edges the reader must see: absolute, lazy (in a function) and `from pkg import module`.
    assert "vlm_service.backends.base" in edges["vlm_service.backends.hf"]
    assert "vlm_checkpoints.tiny_smolvlm" in edges["vlm_service.backends.catalogue"]
    assert "vlm_service.api.convert" in edges["vlm_service.api.servicer"]
    assert "vlm_service.backends.catalogue" in edges["vlm_service.core.engine"]
    assert "vlm_service.backends.smolvlm" in edges["vlm_checkpoints.tiny_smolvlm"]
    assert {"vlm_service.backends.registry", "vlm_service.server", "vlm_checkpoints.builder"} <= set(edges)


#: The server's layers, top to bottom. A module imports modules of its own layer or of layers below,
#: never above; the two leaf packages (images, observability) import neither each other nor anything
#: above the foundation.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entry", ("vlm_service.__main__", "vlm_service.cli", "vlm_service.server")),
    ("api", ("vlm_service.api",)),
    ("core", ("vlm_service.core",)),
    ("backends", ("vlm_service.backends",)),
    ("images", ("vlm_service.images",)),
    ("observability", ("vlm_service.observability",)),
    ("foundation", ("vlm_service", "vlm_service.config", "vlm_service.types", "vlm_service.errors")),
]
LEAVES = {"images", "observability"}


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or (prefix != RUNTIME and module.startswith(prefix + ".")) for prefix in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS or move it into a subpackage")


def test_the_package_rules_hold():
    """api -> core -> backends -> images / observability -> config, types, errors: never upward, and
    the leaves never sideways. Every runtime module is in exactly one layer."""
    edges = graph()
    names = [name for name, _ in LAYERS]
    wrong = []
    for module, targets in edges.items():
        if not module.startswith(RUNTIME):
            continue
        rank = layer_of(module)
        for target in targets:
            if not target.startswith(RUNTIME):
                continue
            other = layer_of(target)
            sideways = other != rank and names[rank] in LEAVES and names[other] in LEAVES
            if other < rank or sideways:
                wrong.append(f"{module} ({names[rank]}) imports {target} ({names[other]})")
    assert not wrong, "imports against the package rules:\n" + "\n".join(sorted(wrong))


def test_the_package_rules_test_can_fail():
    """The rules are read from the same graph: an upward edge added to it is reported."""
    assert layer_of("vlm_service.core.job") > layer_of("vlm_service.api.servicer")
    assert layer_of("vlm_service.errors") == len(LAYERS) - 1
    assert layer_of("vlm_service.images.decode") < layer_of("vlm_service.config")


def module_level_imports(path: Path) -> set[str]:
    """The modules named by the import statements that run when ``path`` is imported: every one
    outside a function's body (a class body or an ``if``, ``TYPE_CHECKING`` included, counts)."""
    found = set()
    todo = list(ast.parse(path.read_text(), str(path)).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_the_runtime_imports_the_checkpoint_builders_only_lazily():
    """Importing any runtime module never imports the training code: the runtime reaches
    ``vlm_checkpoints`` only from inside a function (to build or find a built-in checkpoint)."""
    runtime = {name: path for name, path in modules().items() if name.partition(".")[0] == RUNTIME}
    eager = {
        name: sorted(found)
        for name, path in runtime.items()
        if (found := {m for m in module_level_imports(path) if m.partition(".")[0] == CHECKPOINTS})
    }
    assert not eager, f"runtime modules import {CHECKPOINTS} at module level: {eager}"


def test_no_module_imports_itself_through_others():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(component) for component in found)


def reach(edges: dict[str, set[str]], start: str, skip: frozenset[str] = frozenset()) -> set[str]:
    """The modules ``start`` imports, directly or not, not going through ``skip``."""
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()] - seen - skip:
            seen.add(target)
            todo.append(target)
    return seen


GENERIC_BACKEND = {
    "vlm_service.backends",
    "vlm_service.backends.base",
    "vlm_service.backends.runtime",
    "vlm_service.backends.registry",
    "vlm_service.backends.catalogue",
    "vlm_service.backends.detokenizer",
}


def test_the_generic_layers_know_no_family():
    """The core (the scheduler's loop, the job, admission, the engine) and the API import no family
    module nor a family's batch: they see a backend through backends/base.py only. The engine reaches
    the families only through the registry, which names them (and imports them lazily, by name), and
    the catalogue, whose tiny-checkpoint builders import them lazily."""
    edges = graph()
    families = {name for name in edges if name.startswith("vlm_service.backends.")} - GENERIC_BACKEND
    for generic in ("core.scheduler", "core.job", "core.admission", "core.served", "observability.metrics"):
        reached = reach(edges, f"vlm_service.{generic}") & families
        assert not reached, f"vlm_service.{generic} imports {sorted(reached)}"
    for entry in ("core.engine", "api.servicer", "server"):
        through = frozenset({"vlm_service.backends.registry", "vlm_service.backends.catalogue"})
        reached = reach(edges, f"vlm_service.{entry}", skip=through) & families
        assert not reached, f"vlm_service.{entry} imports {sorted(reached)} other than through the registry"
    # The families' shared batch needs a backend only through its protocol.
    assert "vlm_service.backends.hf" not in reach(edges, "vlm_service.backends.decode_batch")


def external_imports(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports (lazy and type-only imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_protobuf_and_grpc_stay_at_the_edge():
    """core/ and backends/ know neither the service's messages nor grpc: the API converts at the edge."""
    edge = ("grpc", "vlm.v1", "google.protobuf", "google.rpc", "grpc_status", "grpc_health")
    wrong = {
        name: sorted(m for m in external_imports(path) if m.startswith(edge))
        for name, path in modules().items()
        if name.startswith(("vlm_service.core", "vlm_service.backends"))
    }
    wrong = {name: found for name, found in wrong.items() if found}
    assert not wrong, f"protobuf or grpc below the API: {wrong}"
