"""Server configuration, declared once.

Every setting is one field of :class:`Settings` with its type, default, help text, command-line flag
and environment-variable twin. The CLI, the docs' configuration page (generated from it) and the docker-compose file
all derive from (or are tested against) this one declaration. Values are validated at start-up so a
misconfigured server fails before it binds a port, with a message naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the flag and its environment variable."""


def _setting(default, help: str, *, flag: str | None = None, env: str | None = None, choices=None, repeat=False):
    metadata = {"help": help, "flag": flag, "env": env, "choices": choices, "repeat": repeat}
    if repeat:
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Settings:
    """Everything `vlm-service serve` can be told. Flags win over environment variables."""

    host: str = _setting("0.0.0.0", "Address to listen on.")
    port: int = _setting(50051, "Port to listen on; 0 picks a free port (printed at start-up).")
    models: list[str] = _setting(
        [],
        "Model to serve, as NAME or NAME=SOURCE; repeat for several. The first is the default. "
        "SOURCE is a Hugging Face repo id (optionally @revision) or a local checkpoint directory; "
        "NAME alone is a built-in name (see the model catalogue). Default: tiny-smolvlm.",
        flag="--model",
        env="VLM_MODELS",
        repeat=True,
    )
    device: str = _setting("auto", "Device for the models: auto picks cuda when available.", choices=DEVICES)
    dtype: str = _setting(
        "auto",
        "Weight dtype: auto is bfloat16 on cuda, and on a CPU with bfloat16 instructions (AVX512-BF16, AMX) "
        "for a checkpoint saved in bfloat16; float32 otherwise.",
        choices=DTYPES,
    )
    max_queue: int = _setting(
        16, "Requests that may wait per model; beyond it requests get RESOURCE_EXHAUSTED at once."
    )
    torch_threads: int = _setting(
        0,
        "Threads torch uses inside one operation on the CPU. 0 (auto): on a CPU, every core for a model of "
        "50M parameters or more (compute-bound), one fewer for a smaller one, leaving a core to the gRPC "
        "server (torch's spinning threads otherwise starve it); torch's default on a GPU.",
    )
    max_batch_size: int = _setting(
        16,
        "Requests decoded together per model (continuous batching: new ones join between decode steps); "
        "1 decodes one at a time. Moondream always runs one at a time.",
    )
    chunked_prefill: str = _setting(
        "auto",
        "Cut a joining request's prefill into chunks (three vision encoder layers over one view of its picture, then "
        "spans of prompt tokens) that run between the decode steps of the requests already streaming, so a new "
        "picture never freezes them for its whole prefill: on, off, or auto (on for a model of 50M parameters or "
        "more). Chunks depend on the request only, so an answer is the same whatever runs beside it. SmolVLM; "
        "Qwen2-VL and Moondream prefill in one piece.",
        choices=("auto", "on", "off"),
    )
    openvino: str = _setting(
        "auto",
        "Run SmolVLM's vision encoder layers and its decode steps with OpenVINO's CPU runtime, converted from "
        "the loaded weights when first used (CPU only): on, off, or auto (on for a model of 50M parameters "
        "or more on a CPU). Qwen2-VL and Moondream always run on PyTorch.",
        choices=("auto", "on", "off"),
    )
    prefill_budget_ms: float = _setting(
        250.0,
        "Milliseconds of prefill work (requests joining a batch) between two decode steps while others stream; "
        "at least one chunk runs each time. 0: one chunk per decode step.",
    )
    image_cache_size: int = _setting(
        32, "Images per model whose preprocessing and vision features are kept for reuse (by content hash); 0 is off."
    )
    image_cache_bytes: int = _setting(
        0,
        "Bytes of tensors (preprocessing and vision features, on the model's device) the image cache of each model "
        "may keep; least recently used images go first. 0 (auto): 1/32 of the device's memory (RAM on a CPU).",
    )
    max_image_decodes: int = _setting(
        4,
        "Images decoded at once (in processes at a lower CPU priority, never on the event loop); more requests "
        "wait for a slot, counted against --max-streams, and beyond that get RESOURCE_EXHAUSTED at once.",
    )
    metrics_port: int = _setting(0, "Port for the Prometheus metrics endpoint (HTTP /metrics); 0 turns it off.")
    default_max_new_tokens: int = _setting(
        256, "max_new_tokens for a Query that leaves it 0 (Captions use their length's budget)."
    )
    max_new_tokens_limit: int = _setting(
        2048, "The largest max_new_tokens a request may ask for; above it is INVALID_ARGUMENT."
    )
    max_image_bytes: int = _setting(
        20 * 1024 * 1024, "Largest accepted image file in bytes; larger is INVALID_ARGUMENT."
    )
    max_image_pixels: int = _setting(
        40_000_000,
        "Largest accepted image in pixels (width x height), checked from the header before decoding; the only "
        "limit (Pillow's own, about 89.5 million, is off), so a larger value is honoured.",
    )
    max_question_chars: int = _setting(4000, "Longest accepted question, in characters.")
    max_stop_sequences: int = _setting(8, "How many stop strings a request may give.")
    max_objects: int = _setting(
        50, "Most objects a Detect or Point returns: its default (max_objects 0) and its limit."
    )
    max_object_chars: int = _setting(200, "Longest accepted Detect/Point object phrase, in characters.")
    max_images_per_query: int = _setting(
        4,
        "Most pictures one Query may carry (QueryRequest.images); a model takes fewer if its family does "
        "(Moondream: 1). Each picture is decoded, bounded and cached on its own.",
    )
    max_stop_chars: int = _setting(64, "Longest accepted stop string, in characters.")
    grace_period: float = _setting(
        10.0, "Seconds that in-flight streams get to finish on SIGTERM/SIGINT before they are cancelled."
    )
    reflection: bool = _setting(True, "Serve gRPC server reflection (for grpcurl list/describe).")
    max_streams: int = _setting(
        64,
        "Concurrent Caption, Query, Detect, Point and Watch streams the whole server accepts (a Watch stream holds one for its "
        "whole life); beyond it RESOURCE_EXHAUSTED at once.",
    )
    auth_token: str = _setting(
        "", "Bearer token every RPC must send (`authorization: Bearer TOKEN`); empty turns authentication off."
    )
    auth_token_file: str = _setting(
        "",
        "File holding the bearer token (surrounding whitespace stripped), read at start-up; "
        "keeps the token out of `ps` and the environment. Exclusive with --auth-token.",
    )
    reflection_requires_auth: bool = _setting(
        True, "With --auth-token, whether reflection needs the token too (health checks never do)."
    )
    tls_cert: str = _setting("", "PEM certificate chain of the server; with --tls-key, serve TLS instead of plaintext.")
    tls_key: str = _setting("", "PEM private key of the server certificate.")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."
    )
    stall_timeout: float = _setting(
        300.0,
        "Seconds a model's scheduler may work without progress (a decode step, a chunk of a prefill) before the model is "
        "declared stuck: its running requests end with ABORTED, queued and new ones with UNAVAILABLE, its health "
        "turns NOT_SERVING, and the server drains and exits with code 3 so that its supervisor restarts it.",
    )
    keepalive_time: float = _setting(
        30.0, "Seconds between HTTP/2 keepalive pings to each client, to find clients that vanished."
    )
    keepalive_timeout: float = _setting(
        10.0, "Seconds to wait for a ping's answer before the connection (and its streams) is dropped."
    )
    cache_dir: Path = _setting(
        Path(os.path.expanduser("~/.cache/vlm-service")),
        "Where the tiny built-in checkpoints are built on first use.",
    )
    moondream_revision: str = _setting(
        "2025-06-21", "The vikhyatk/moondream2 revision the built-in name `moondream` loads (remote code is pinned)."
    )
    warmup: bool = _setting(True, "Run one short generation per model before reporting SERVING.")
    log_level: str = _setting("info", "Log level.", choices=LOG_LEVELS)
    log_format: str = _setting(
        "text", "Log format: text, or json (one JSON object a line) for log collectors.", choices=LOG_FORMATS
    )
    access_log: bool = _setting(True, "Log one line per RPC (method, model, status, request id, tokens, times, peer).")
    otlp_endpoint: str = _setting(
        "",
        "OTLP/gRPC endpoint that receives the traces (e.g. http://otel-collector:4317); empty: tracing off, "
        "unless OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )

    def validate(self) -> Settings:
        """Check every value; raise ConfigError naming the setting."""
        positive = (
            "max_queue",
            "max_batch_size",
            "default_max_new_tokens",
            "max_new_tokens_limit",
            "max_image_bytes",
            "max_image_pixels",
            "max_question_chars",
            "max_stop_chars",
            "max_objects",
            "max_object_chars",
            "max_images_per_query",
            "max_streams",
            "stall_timeout",
            "max_image_decodes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_describe(name)} must be positive, got {getattr(self, name)}")
        for name in (
            "max_stop_sequences",
            "torch_threads",
            "image_cache_size",
            "image_cache_bytes",
            "grace_period",
            "prefill_budget_ms",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_describe(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{_describe(name)} must be between 0 and 65535, got {getattr(self, name)}")
        if self.keepalive_time <= 0 or self.keepalive_timeout <= 0:
            raise ConfigError(f"{_describe('keepalive_time')} and {_describe('keepalive_timeout')} must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"{_describe('tls_cert')} and {_describe('tls_key')} go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(f"{_describe('tls_client_ca')} needs {_describe('tls_cert')} and {_describe('tls_key')}")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{_describe(name)}: no such file: {path}")
        if self.auth_token and self.auth_token_file:
            raise ConfigError(f"{_describe('auth_token')} and {_describe('auth_token_file')} exclude each other")
        _check_token(self.bearer_token)
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(
                f"{_describe('default_max_new_tokens')} ({self.default_max_new_tokens}) exceeds "
                f"{_describe('max_new_tokens_limit')} ({self.max_new_tokens_limit})"
            )
        for name, spec in _specs().items():
            if spec.choices and getattr(self, name) not in spec.choices:
                raise ConfigError(
                    f"{_describe(name)} must be one of {', '.join(spec.choices)}, got {getattr(self, name)!r}"
                )
        return self

    @property
    def bearer_token(self) -> str:
        """The token RPCs must send: --auth-token, or the stripped content of --auth-token-file
        (read when called: at start-up); empty when authentication is off."""
        if not self.auth_token_file:
            return self.auth_token
        try:
            token = Path(self.auth_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{_describe('auth_token_file')}: cannot read {self.auth_token_file}: {exc}") from None
        if not token:
            raise ConfigError(f"{_describe('auth_token_file')}: {self.auth_token_file} is empty")
        return token


def _check_token(token: str) -> None:
    """A token travels in an HTTP/2 header: printable ASCII without spaces (RFC 6750's token68, loosely)."""
    bad = sorted({ch for ch in token if not "!" <= ch <= "~"})
    if bad:
        raise ConfigError(
            f"the bearer token ({_describe('auth_token')} or {_describe('auth_token_file')}) must be printable "
            f"ASCII without spaces or line breaks; it contains {', '.join(repr(ch) for ch in bad[:5])}"
        )


@dataclass(frozen=True)
class _Spec:
    name: str
    type: type
    default: object
    help: str
    flag: str
    env: str
    choices: tuple[str, ...] | None
    repeat: bool


def _specs() -> dict[str, _Spec]:
    hints = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path, "list[str]": str}
    out = {}
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        default = f.default_factory() if meta["repeat"] else f.default
        out[f.name] = _Spec(
            name=f.name,
            type=hints[f.type],
            default=default,
            help=meta["help"],
            flag=meta["flag"] or "--" + f.name.replace("_", "-"),
            env=meta["env"] or "VLM_" + f.name.upper(),
            choices=meta["choices"],
            repeat=meta["repeat"],
        )
    return out


def settings_table() -> list[_Spec]:
    """Every setting, in declaration order (for docs and tests)."""
    return list(_specs().values())


def _describe(name: str) -> str:
    spec = _specs()[name]
    return f"{spec.flag} (${spec.env})"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _convert(spec: _Spec, raw: str):
    try:
        if spec.type is bool:
            return _parse_bool(raw)
        return spec.type(raw)
    except ValueError as exc:
        raise ConfigError(f"{spec.flag} (${spec.env}): invalid value {raw!r}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one flag per setting (or per setting in ``only``) to ``parser``; defaults are left unset so
    env vars can fill in."""
    for spec in _specs().values():
        if only is not None and spec.name not in only:
            continue
        help_text = f"{spec.help} [env {spec.env}; default {_default_text(spec)}]"
        if spec.type is bool:
            parser.add_argument(
                spec.flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif spec.repeat:
            parser.add_argument(spec.flag, dest=spec.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(spec.flag, dest=spec.name, default=None, metavar=spec.name.upper(), help=help_text)


def _default_text(spec: _Spec) -> str:
    if spec.repeat:
        return "tiny-smolvlm"
    return str(spec.default).lower() if spec.type is bool else str(spec.default)


def load_settings(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build validated Settings from parsed flags, then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    values = {}
    for spec in _specs().values():
        flag_value = getattr(args, spec.name, None) if args is not None else None
        if flag_value is not None:
            values[spec.name] = flag_value if spec.type is bool or spec.repeat else _convert(spec, flag_value)
        elif environ.get(spec.env, "").strip():
            raw = environ[spec.env]
            values[spec.name] = (
                [part.strip() for part in raw.split(",") if part.strip()] if spec.repeat else _convert(spec, raw)
            )
    return Settings(**values).validate()
