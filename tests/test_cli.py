"""cli.py: argument parsing, PERSSD_* environment variables, and the serve entry point's checks."""
from __future__ import annotations

import subprocess
import sys

import pytest

from csi_perssd import __version__, cli
from csi_perssd.config import Config

ALL_ENV = [k for k in __import__("os").environ if k.startswith("PERSSD_")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in ALL_ENV:
        monkeypatch.delenv(k, raising=False)


def serve_config(argv: list[str]) -> Config:
    return cli.config_from_args(cli.build_parser().parse_args(["serve", *argv]))


def test_serve_defaults_are_the_config_defaults():
    assert serve_config([]) == Config()


def test_serve_flags():
    cfg = serve_config(["--mode", "node", "--endpoint", "unix:///run/csi/csi.sock", "--node-id", "n1",
                        "--pool", "fast", "--state-dir", "/s", "--backend", "rawfile", "--rawfile-dir", "/r",
                        "--catalog", "file:///c", "--max-volume-bytes", "1073741824", "--max-volumes-per-node", "7",
                        "--heartbeat-seconds", "2.5", "--enable-alpha"])
    assert (cfg.mode, cfg.node_id, cfg.pool, cfg.state_dir, cfg.rawfile_dir, cfg.catalog) == \
        ("node", "n1", "fast", "/s", "/r", "file:///c")
    assert cfg.socket_path == "/run/csi/csi.sock"
    assert cfg.max_volume_bytes == 1 << 30 and isinstance(cfg.max_volume_bytes, int)
    assert cfg.max_volumes_per_node == 7 and cfg.heartbeat_seconds == 2.5 and cfg.enable_alpha is True


def test_environment_variables_set_every_flag(monkeypatch):
    monkeypatch.setenv("PERSSD_MODE", "controller")
    monkeypatch.setenv("PERSSD_NODE_ID", "from-env")
    monkeypatch.setenv("PERSSD_CATALOG", "s3://bucket/prefix")
    monkeypatch.setenv("PERSSD_MAX_VOLUMES_PER_NODE", "12")
    monkeypatch.setenv("PERSSD_GRACE_SECONDS", "4.5")
    monkeypatch.setenv("PERSSD_ENABLE_ALPHA", "true")
    monkeypatch.setenv("PERSSD_LOG_LEVEL", "debug")
    cfg = serve_config([])
    assert (cfg.mode, cfg.node_id, cfg.catalog, cfg.max_volumes_per_node, cfg.grace_seconds, cfg.enable_alpha,
            cfg.log_level) == ("controller", "from-env", "s3://bucket/prefix", 12, 4.5, True, "debug")


@pytest.mark.parametrize("value,want", [("1", True), ("yes", True), ("on", True), ("0", False), ("false", False)])
def test_boolean_environment_values(monkeypatch, value, want):
    monkeypatch.setenv("PERSSD_ENABLE_ALPHA", value)
    assert serve_config([]).enable_alpha is want


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("PERSSD_NODE_ID", "from-env")
    monkeypatch.setenv("PERSSD_POOL", "env-pool")
    cfg = serve_config(["--node-id", "from-flag"])
    assert cfg.node_id == "from-flag" and cfg.pool == "env-pool"


def test_help_names_the_environment_variable(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "PERSSD_NODE_ID" in out and "PERSSD_CATALOG" in out


@pytest.mark.parametrize("argv", [["serve", "--mode", "everything"], ["serve", "--backend", "zfs"],
                                  ["serve", "--max-volumes-per-node", "many"], [], ["frobnicate"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err


def test_bad_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv("PERSSD_MAX_VOLUMES_PER_NODE", "many")
    with pytest.raises(ValueError):
        cli.build_parser()


def test_version():
    res = subprocess.run([sys.executable, "-m", "csi_perssd.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and __version__ in res.stdout


def test_node_mode_without_node_id_exits_2(tmp_path, capsys):
    rc = cli.main(["serve", "--mode", "node", "--endpoint", f"unix://{tmp_path}/csi.sock",
                   "--catalog", f"file://{tmp_path}/catalog", "--state-dir", str(tmp_path / "state"),
                   "--rawfile-dir", str(tmp_path / "vols")])
    assert rc == 2
    assert "--node-id" in capsys.readouterr().err


def test_endpoint_must_be_a_unix_socket():
    with pytest.raises(ValueError):
        _ = serve_config(["--endpoint", "tcp://127.0.0.1:10000"]).socket_path


def test_admin_commands_parse():
    p = cli.build_parser()
    a = p.parse_args(["takeover", "pvol-1", "--from", "node-a", "--to", "node-b"])
    assert (a.volume_id, a.from_node, a.to_node) == ("pvol-1", "node-a", "node-b")
    assert p.parse_args(["gc", "--dry-run"]).dry_run is True
    assert p.parse_args(["inspect", "pvol-1"]).id == "pvol-1"
