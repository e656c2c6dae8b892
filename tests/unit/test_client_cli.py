"""The vlm-client command line without a server: where its options may go, where the token comes from,
and --version on both CLIs."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from vlm_client import cli as client_cli
from vlm_service import cli as service_cli

CONNECTION = [
    (["--server", "vlm.example:443"], "server", "vlm.example:443"),
    (["--timeout", "2.5"], "timeout", 2.5),
    (["--token-file", "/run/secrets/vlm"], "token_file", "/run/secrets/vlm"),
    (["--token", "abc"], "token", "abc"),
    (["--tls"], "tls", True),
    (["--ca-cert", "ca.pem"], "ca_cert", "ca.pem"),
    (["--client-cert", "c.pem"], "client_cert", "c.pem"),
    (["--client-key", "c.key"], "client_key", "c.key"),
    (["--wait-for-ready"], "wait_for_ready", True),
]
COMMANDS = [["caption", "img.png"], ["query", "img.png", "What is it?"], ["watch", "frames/"], ["models"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(("flag", "attribute", "value"), CONNECTION, ids=lambda v: str(v))
def test_connection_options_go_before_or_after_the_subcommand(command, flag, attribute, value):
    parser = client_cli.build_parser()
    before = parser.parse_args([*flag, *command])
    after = parser.parse_args([*command, *flag])
    assert getattr(before, attribute) == getattr(after, attribute) == value
    # Absent, each keeps its default whichever side the others are on.
    assert getattr(parser.parse_args(command), attribute) in (None, False)


def test_an_option_after_the_subcommand_wins_over_one_before():
    args = client_cli.build_parser().parse_args(["--server", "a:1", "caption", "x.png", "--server", "b:2", "--tls"])
    assert args.server == "b:2" and args.tls


def _token(argv, environ):
    return client_cli.resolve_token(client_cli.build_parser().parse_args([*argv, "models"]), environ)


def test_token_sources_and_their_order(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env_file = tmp_path / "env-token"
    env_file.write_text("  from-env-file ")
    assert _token([], {}) is None
    assert _token(["--token", "flag"], {"VLM_TOKEN": "env"}) == "flag"
    assert _token(["--token-file", str(token_file)], {"VLM_TOKEN": "env"}) == "from-file"
    assert _token([], {"VLM_TOKEN": "env", "VLM_TOKEN_FILE": str(env_file)}) == "env"
    assert _token([], {"VLM_TOKEN_FILE": str(env_file)}) == "from-env-file"


def test_bad_token_sources_are_usage_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(client_cli.UsageError, match="not both"):
        _token(["--token", "a", "--token-file", str(empty)], {})
    with pytest.raises(client_cli.UsageError, match="is empty"):
        _token(["--token-file", str(empty)], {})
    with pytest.raises(client_cli.UsageError, match="cannot read the token file .*missing: No such file"):
        _token(["--token-file", str(tmp_path / "missing")], {})


def test_usage_errors_exit_2_without_a_traceback(tmp_path, capsys):
    assert client_cli.main(["models", "--token-file", str(tmp_path / "missing")], environ={}) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm-client: cannot read the token file") and "Traceback" not in err


@pytest.mark.parametrize(
    ("main", "expected"),
    [
        (client_cli.main, f"vlm-client {version('vlm-client')}"),
        (service_cli.main, f"vlm-service {version('vlm-service')} (vlm-client {version('vlm-client')}, grpcio "),
    ],
)
def test_version(main, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(expected)


def test_watch_sends_a_directorys_images_or_a_globs_files_in_name_order(tmp_path):
    for name in ("b.png", "a.JPG", "c.txt", "d.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert client_cli.frame_files(str(tmp_path)) == [str(tmp_path / n) for n in ("a.JPG", "b.png", "d.webp")]
    assert client_cli.frame_files(str(tmp_path / "*.png")) == [str(tmp_path / "b.png")]
    with pytest.raises(client_cli.UsageError, match="no files match"):
        client_cli.frame_files(str(tmp_path / "*.gif"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(client_cli.UsageError, match="no images in"):
        client_cli.frame_files(str(empty))
    assert list(client_cli.paced(["x", "y"], 0)) == [(0, "x"), (1, "y")]


def test_watch_options(tmp_path, capsys):
    args = client_cli.build_parser().parse_args(
        ["watch", "d/", "--fps", "20", "--question", "Why?", "--policy", "interrupt"]
    )
    assert (args.fps, args.question, args.policy) == (20.0, "Why?", "interrupt")
    defaults = client_cli.build_parser().parse_args(["watch", "d/"])
    assert (defaults.fps, defaults.question, defaults.policy) == (10.0, "", "latest")
    (tmp_path / "a.png").write_bytes(b"x")
    assert client_cli.main(["watch", str(tmp_path), "--fps", "-1"], {}) == 2
    assert "--fps must be 0 or more" in capsys.readouterr().err
    assert client_cli.main(["watch", str(tmp_path / "none-*.png")], {}) == 2
    assert "no files match" in capsys.readouterr().err
