"""The generated parts of the documentation site, rendered at build time (`make docs`).

mkdocs-gen-files runs this file during `mkdocs build` (mkdocs.yml names it); it fills two markers in
pages that are otherwise written by hand:

- ``<!-- generated: api-reference -->`` in ``api.md``: the services, RPCs, messages, fields and enums of
  ``protos/vlm/v1/*.proto`` with their comments. protoc (``python -m grpc_tools.protoc``) compiles the
  files into a descriptor set with ``--include_source_info``, which keeps every comment beside the
  element it documents (buf lint's COMMENTS rule makes sure there is one).
- ``<!-- generated: settings-table -->`` in ``configuration.md``: every setting of
  ``vlm_service.config.Settings`` (flag, environment variable, default, help), in declaration order,
  from ``settings_table()``: the same declaration the CLI's flags and ``--help`` come from.

The tests import :func:`render_api_reference` and :func:`render_settings_table` to check what they give.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = sorted((PROTO_ROOT / "vlm" / "v1").glob("*.proto"))

API_MARKER = "<!-- generated: api-reference -->"
SETTINGS_MARKER = "<!-- generated: settings-table -->"

# descriptor.proto's field numbers, as they appear in SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


# --- the API reference, from the protos ------------------------------------------------------------


def compile_descriptor_set(proto_files: Sequence[Path] = PROTO_FILES):
    """``FileDescriptorSet`` of ``proto_files`` (and what they import), with their source comments."""
    from google.protobuf import descriptor_pb2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            "--include_source_info",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *(str(path.relative_to(PROTO_ROOT)) for path in proto_files),
        ]
        result = subprocess.run(command, cwd=PROTO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed ({result.returncode}): {result.stderr.strip()}")
        descriptors = descriptor_pb2.FileDescriptorSet()
        descriptors.ParseFromString(out.read_bytes())
    return descriptors


def _comments(file) -> dict[tuple[int, ...], str]:
    """Each element's leading comment (with its detached trailing one, if any), by its path."""
    out = {}
    for location in file.source_code_info.location:
        text = location.leading_comments or location.trailing_comments
        if text:
            out[tuple(location.path)] = text
    return out


def _lines(file) -> dict[tuple[int, ...], int]:
    """Each element's first line in its file, by its path."""
    return {tuple(location.path): location.span[0] for location in file.source_code_info.location}


def _markdown(comment: str) -> str:
    """A proto comment as Markdown: paragraphs as they are; a paragraph whose lines are indented (an
    aligned list, as in the service's status codes) as a preformatted block."""
    lines = [line[1:] if line.startswith(" ") else line for line in comment.rstrip("\n").split("\n")]
    blocks, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    out = []
    for block in blocks:
        if any(line.startswith(" ") for line in block):
            # A heading line followed by an aligned list: the heading stays prose.
            head = [] if block[0].startswith(" ") else [block.pop(0)]
            if head:
                out.append(" ".join(head))
            out.append("```text\n" + textwrap.dedent("\n".join(block)) + "\n```")
        else:
            out.append(" ".join(line.strip() for line in block))
    return "\n\n".join(out)


def _cell(comment: str) -> str:
    """A comment inside a table cell: one line, pipes escaped."""
    return " ".join(comment.split()).replace("|", "\\|")


def _anchor(full_name: str) -> str:
    return full_name.lstrip(".").replace(".", "-").lower()


_SCALARS = {
    1: "double",
    2: "float",
    3: "int64",
    4: "uint64",
    5: "int32",
    6: "fixed64",
    7: "fixed32",
    8: "bool",
    9: "string",
    12: "bytes",
    13: "uint32",
    15: "sfixed32",
    16: "sfixed64",
    17: "sint32",
    18: "sint64",
}


class _Types:
    """Which message and enum names are documented on the page (and so can be linked)."""

    def __init__(self, documented: Iterable[str]):
        self.documented = set(documented)

    def link(self, full_name: str) -> str:
        name = full_name.lstrip(".")
        if full_name in self.documented:
            return f"[`{name.rsplit('.', 1)[-1]}`](#{_anchor(full_name)})"
        return f"`{name}`"

    def field_type(self, field) -> str:
        if field.type_name:
            return self.link(field.type_name)
        return f"`{_SCALARS[field.type]}`"


def render_api_reference(descriptors=None) -> str:
    """The API reference of ``protos/vlm/v1`` as Markdown: each file's services (their RPCs), messages
    (their fields, oneofs and nested types) and enums (their values), each with its comment."""
    if descriptors is None:
        descriptors = compile_descriptor_set()
    ours = [f for f in descriptors.file if f.name.startswith("vlm/")]
    documented = set()
    for file in ours:
        prefix = f".{file.package}" if file.package else ""
        stack = [(prefix, m) for m in file.message_type]
        documented.update(f"{prefix}.{e.name}" for e in file.enum_type)
        while stack:
            scope, message = stack.pop()
            name = f"{scope}.{message.name}"
            documented.add(name)
            stack.extend((name, nested) for nested in message.nested_type)
            documented.update(f"{name}.{e.name}" for e in message.enum_type)
    types = _Types(documented)
    out = []
    for file in ours:
        comments = _comments(file)
        package = file.package
        out.append(f"### `{file.name}`")
        out.append(f"Package `{package}`." + (f" {_markdown(comments[(12,)])}" if (12,) in comments else ""))
        for s, service in enumerate(file.service):
            path = (_FILE_SERVICE, s)
            out.append(f"### Service `{service.name}` {{ #{_anchor(package + '.' + service.name)} }}")
            out.append(f"`{package}.{service.name}`")
            if path in comments:
                out.append(_markdown(comments[path]))
            rows = ["| RPC | Request | Response | Description |", "|---|---|---|---|"]
            for m, method in enumerate(service.method):
                request = ("stream " if method.client_streaming else "") + types.link(method.input_type)
                response = ("stream " if method.server_streaming else "") + types.link(method.output_type)
                comment = _cell(comments.get(path + (_SERVICE_METHOD, m), ""))
                rows.append(f"| `{method.name}` | {request} | {response} | {comment} |")
            out.append("\n".join(rows))
        # Messages and enums in the order the file declares them.
        lines = _lines(file)
        declared = [((_FILE_ENUM, e), enum) for e, enum in enumerate(file.enum_type)]
        declared += [((_FILE_MESSAGE, m), message) for m, message in enumerate(file.message_type)]
        for path, item in sorted(declared, key=lambda pair: lines.get(pair[0], 0)):
            if path[0] == _FILE_ENUM:
                out.extend(_render_enum(item, f"{package}.{item.name}", path, comments))
            else:
                out.extend(_render_message(item, f"{package}.{item.name}", path, comments, types))
    return "\n\n".join(out) + "\n"


def _render_enum(enum, full_name: str, path: tuple[int, ...], comments) -> list[str]:
    out = [f"### Enum `{enum.name}` {{ #{_anchor(full_name)} }}", f"`{full_name}`"]
    if path in comments:
        out.append(_markdown(comments[path]))
    rows = ["| Value | Number | Description |", "|---|---:|---|"]
    for v, value in enumerate(enum.value):
        rows.append(f"| `{value.name}` | {value.number} | {_cell(comments.get(path + (_ENUM_VALUE, v), ''))} |")
    out.append("\n".join(rows))
    return out


def _render_message(message, full_name: str, path: tuple[int, ...], comments, types: _Types) -> list[str]:
    out = [f"### Message `{message.name}` {{ #{_anchor(full_name)} }}", f"`{full_name}`"]
    if path in comments:
        out.append(_markdown(comments[path]))
    if message.field:
        rows = ["| Field | Number | Type | Description |", "|---|---:|---|---|"]
        for f, field in enumerate(message.field):
            kind = types.field_type(field)
            if field.label == field.LABEL_REPEATED:
                kind = f"repeated {kind}"
            elif field.proto3_optional:
                kind = f"optional {kind}"
            elif field.HasField("oneof_index"):
                oneof = message.oneof_decl[field.oneof_index].name
                kind = f"{kind} (oneof `{oneof}`)"
            comment = _cell(comments.get(path + (_MESSAGE_FIELD, f), ""))
            rows.append(f"| `{field.name}` | {field.number} | {kind} | {comment} |")
        out.append("\n".join(rows))
    else:
        out.append("No fields.")
    for o, oneof in enumerate(message.oneof_decl):
        members = [field for field in message.field if field.HasField("oneof_index") and field.oneof_index == o]
        if members and not any(field.proto3_optional for field in members):
            names = ", ".join(f"`{field.name}`" for field in members)
            comment = comments.get(path + (_MESSAGE_ONEOF, o))
            out.append(f"Oneof `{oneof.name}` ({names})" + (f": {_cell(comment)}" if comment else "."))
    for e, enum in enumerate(message.enum_type):
        out.extend(_render_enum(enum, f"{full_name}.{enum.name}", path + (_MESSAGE_ENUM, e), comments))
    for n, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            out.extend(
                _render_message(nested, f"{full_name}.{nested.name}", path + (_MESSAGE_NESTED, n), comments, types)
            )
    return out


# --- the configuration table, from Settings ---------------------------------------------------------


def _default(spec) -> str:
    """A setting's default as an operator writes it."""
    if spec.repeat:
        if spec.default:
            return ", ".join(f"`{value}`" for value in spec.default)
        stated = re.search(r"Default: ([\w.-]+?)\.?$", spec.help)
        return f"`{stated.group(1)}`" if stated else "(none)"
    if spec.type is bool:
        return f"`{str(spec.default).lower()}`"
    if spec.default == "":
        return "(empty)"
    text = str(spec.default)
    home = str(Path.home())
    if text.startswith(home + "/"):
        text = "~" + text[len(home) :]
    return f"`{text}`"


def render_settings_table(specs=None) -> str:
    """Every setting as one row of a Markdown table: flag, environment variable, default, meaning."""
    if specs is None:
        sys.path.insert(0, str(ROOT))
        from vlm_service.config import settings_table

        specs = settings_table()
    rows = ["| Flag | Environment | Default | Meaning |", "|---|---|---|---|"]
    for spec in specs:
        meaning = _cell(spec.help)
        if spec.choices:
            meaning += " One of " + ", ".join(f"`{choice}`" for choice in spec.choices) + "."
        rows.append(f"| `{spec.flag}` | `{spec.env}` | {_default(spec)} | {meaning} |")
    return "\n".join(rows) + "\n"


# --- the build -------------------------------------------------------------------------------------


def fill(page: str, marker: str, content: str) -> str:
    """``page`` with its one ``marker`` line replaced by ``content``."""
    if page.count(marker) != 1:
        raise ValueError(f"the page should hold {marker!r} exactly once")
    return page.replace(marker, content.rstrip("\n"))


def build() -> None:
    import mkdocs_gen_files

    for name, marker, render in (
        ("api.md", API_MARKER, render_api_reference),
        ("configuration.md", SETTINGS_MARKER, render_settings_table),
    ):
        with mkdocs_gen_files.open(name, "r") as page:
            text = page.read()
        with mkdocs_gen_files.open(name, "w") as page:
            page.write(fill(text, marker, render()))
        mkdocs_gen_files.set_edit_path(name, name)


if __name__ == "<run_path>":  # run by mkdocs-gen-files during `mkdocs build`
    build()
