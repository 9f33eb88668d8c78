"""Flags: A1111's names and defaults, COMMANDLINE_ARGS appended, credentials parsing."""
import pytest

from modules.core import cmd_args


def test_defaults():
    a = cmd_args.parse_args([], environ={})
    assert a.port == 7860 and not a.api and not a.listen
    assert cmd_args.server_host(a) == "127.0.0.1" and not cmd_args.is_exposed(a)


def test_nowebui_moves_port_and_enables_api():
    a = cmd_args.parse_args(["--nowebui"], environ={})
    assert a.port == 7861 and a.api


def test_listen_binds_all_interfaces():
    a = cmd_args.parse_args(["--listen"], environ={})
    assert cmd_args.server_host(a) == "0.0.0.0" and cmd_args.is_exposed(a)
    b = cmd_args.parse_args(["--server-name", "192.0.2.10"], environ={})
    assert cmd_args.server_host(b) == "192.0.2.10" and cmd_args.is_exposed(b)


def test_commandline_args_env_is_appended():
    a = cmd_args.parse_args(["--api"], environ={"COMMANDLINE_ARGS": "--port 9000 --no-half-vae --ckpt 'my model.safetensors'"})
    assert a.api and a.port == 9000 and a.no_half_vae and a.ckpt == "my model.safetensors"


def test_a1111_compat_spellings():
    a = cmd_args.parse_args(["--use-cpu", "all", "--no-half"], environ={})
    assert a.device == "cpu" and a.precision == "full"


def test_credentials():
    assert cmd_args.parse_credentials("a:b, c:d:e\nf:g") == {"a": "b", "c": "d:e", "f": "g"}
    assert cmd_args.parse_credentials(None) == {}
    with pytest.raises(ValueError, match="user:password"):
        cmd_args.parse_credentials("nocolon")
