"""Configuration: flags win over environment variables, which win over defaults; bad values fail early."""

from __future__ import annotations

import argparse

import pytest

from vlm_service.config import ConfigError, Settings, add_arguments, load_settings, settings_table


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(parser.parse_args(argv), env or {})


def test_defaults_serve_the_tiny_model_on_50051():
    settings = parse([])
    assert settings.port == 50051
    assert settings.models == []  # the engine then serves tiny-smolvlm
    assert settings.reflection is True


def test_every_setting_has_a_flag_and_an_env_twin():
    for spec in settings_table():
        assert spec.flag.startswith("--")
        assert spec.env.startswith("VLM_")
        assert spec.help


def test_environment_fills_in_and_flags_win():
    env = {"VLM_PORT": "6000", "VLM_MODELS": "a, b=/tmp/x", "VLM_MAX_QUEUE": "3", "VLM_REFLECTION": "false"}
    settings = parse([], env)
    assert (settings.port, settings.models, settings.max_queue, settings.reflection) == (
        6000,
        ["a", "b=/tmp/x"],
        3,
        False,
    )
    settings = parse(["--port", "7000", "--model", "c", "--reflection"], env)
    assert (settings.port, settings.models, settings.reflection) == (7000, ["c"], True)


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "abc"], {}, "--port ($VLM_PORT)"),
        (["--port", "70000"], {}, "--port"),
        ([], {"VLM_MAX_QUEUE": "0"}, "$VLM_MAX_QUEUE"),
        (["--device", "tpu"], {}, "--device"),
        (["--dtype", "int3"], {}, "--dtype"),
        ([], {"VLM_REFLECTION": "maybe"}, "$VLM_REFLECTION"),
        (["--default-max-new-tokens", "5000"], {}, "--max-new-tokens-limit"),
        (["--metrics-port", "70000"], {}, "--metrics-port"),
        ([], {"VLM_MAX_BATCH_SIZE": "0"}, "$VLM_MAX_BATCH_SIZE"),
        (["--image-cache-size", "-1"], {}, "--image-cache-size"),
        (["--torch-threads", "-2"], {}, "--torch-threads"),
    ],
)
def test_invalid_values_name_the_setting(argv, env, needle):
    with pytest.raises(ConfigError, match=None) as info:
        parse(argv, env)
    assert needle in str(info.value)


def test_settings_validate_directly():
    with pytest.raises(ConfigError):
        Settings(grace_period=-1).validate()
    assert Settings().validate().host == "0.0.0.0"


def test_tls_settings_are_checked_at_start(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="go together"):
        Settings(tls_cert=str(cert)).validate()
    with pytest.raises(ConfigError, match="no such file"):
        Settings(tls_cert=str(cert), tls_key=str(tmp_path / "missing.key")).validate()
    with pytest.raises(ConfigError, match="--tls-client-ca"):
        Settings(tls_client_ca=str(cert)).validate()
    with pytest.raises(ConfigError, match="--max-streams"):
        Settings(max_streams=0).validate()


def test_the_auth_token_file_is_read_stripped_and_checked_at_start(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n  s3cret-from-file \n")
    assert parse(["--auth-token-file", str(token_file)]).bearer_token == "s3cret-from-file"
    assert parse([], {"VLM_AUTH_TOKEN_FILE": str(token_file)}).bearer_token == "s3cret-from-file"
    assert parse([], {"VLM_AUTH_TOKEN": "from-env"}).bearer_token == "from-env"
    assert parse([]).bearer_token == ""
    with pytest.raises(ConfigError, match=r"--auth-token \(\$VLM_AUTH_TOKEN\) and --auth-token-file .* exclude"):
        parse(["--auth-token-file", str(token_file)], {"VLM_AUTH_TOKEN": "from-env"})
    with pytest.raises(ConfigError, match=r"--auth-token-file \(\$VLM_AUTH_TOKEN_FILE\): no such file"):
        parse(["--auth-token-file", str(tmp_path / "missing")])
    token_file.write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        parse(["--auth-token-file", str(token_file)])
    token_file.write_text("two\nlines\n")
    with pytest.raises(ConfigError, match="printable ASCII without spaces or line breaks") as info:
        parse(["--auth-token-file", str(token_file)])
    assert "two" not in str(info.value) and "lines" not in str(info.value), "the message never echoes the token"
    token_file.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        parse(["--auth-token-file", str(token_file)])


def test_a_model_given_as_a_home_relative_directory_is_named_after_it(tmp_path, monkeypatch):
    """`--model ~/ckpt` serves the directory ~/ckpt under the name `ckpt`, not `~/ckpt`."""
    from vlm_service.backends.catalogue import parse_model_arg

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    spec = parse_model_arg("~/ckpt")
    assert spec.name == "ckpt"
    assert spec.source == str((tmp_path / "ckpt").resolve())
