"""The operator CLI for people and for scripts: `ls -o table|wide|json`, `inspect -o json|wide`,
and the progress line of `gc` and `takeover`, drawn on a terminal (a real pty) and never into
a pipe. Runs against a file:// catalog made with the driver's own Catalog."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

from csi_perssd import cli
from csi_perssd.remote.catalog import Catalog, VolumeRecord
from csi_perssd.remote.filestore import FileStore

CAPS = [{"access_type": "mount", "fs_type": "ext4", "mount_flags": [], "mode": "SINGLE_NODE_WRITER"}]
UID = "0b6f1c7e-1111-2222-3333-444455556666"


@pytest.fixture
def catalog(tmp_path: Path) -> tuple[str, list[str]]:
    cat = Catalog(FileStore(str(tmp_path / "bucket")))
    a = VolumeRecord(id="pvol-" + "a" * 32, name=f"pvc-{UID}", size=1 << 30, capabilities=CAPS, pool="rack-a",
                     claim={"namespace": "ml", "name": "train-data", "uid": UID})
    b = VolumeRecord(id="pvol-" + "b" * 32, name="scratch", size=64 << 20, capabilities=CAPS, pool="rack-a")
    for rec in (a, b):
        cat.create_volume(rec)

    def own(r: VolumeRecord) -> None:
        r.owner, r.epoch = "node-a", 3
    cat.update_volume(a.id, own)
    return f"file://{tmp_path / 'bucket'}", [a.id, b.id]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def test_ls_table_wide_and_json(catalog: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    url, (a, b) = catalog
    code, table = _run(capsys, "ls", "--catalog", url)
    assert code == 0 and a in table and b in table and "CLAIM" not in table
    code, wide = _run(capsys, "ls", "-o", "wide", "--catalog", url)
    assert code == 0
    head = wide.splitlines()[0]
    assert head.startswith(table.splitlines()[0]) and head.split()[-4:] == ["POOL", "CLAIM", "COMMITTED-BY", "CREATED"]
    row_a = next(line for line in wide.splitlines() if line.startswith(a))
    assert "ml/train-data" in row_a and "rack-a" in row_a and " node-a " in row_a
    row_b = next(line for line in wide.splitlines() if line.startswith(b))
    assert row_b.split()[-5:-2] == ["rack-a", "-", "-"]      # pool, no claim, never committed
    code, out = _run(capsys, "ls", "-o", "json", "--catalog", url)
    doc = json.loads(out)
    assert code == 0 and {v["id"] for v in doc["volumes"]} == {a, b}
    va = next(v for v in doc["volumes"] if v["id"] == a)
    assert va["claim"] == {"namespace": "ml", "name": "train-data", "uid": UID}
    assert (va["owner"], va["epoch"], va["size"]) == ("node-a", 3, 1 << 30)
    assert doc["snapshots"] == [] and doc["chunks"] == 0 and doc["problems"] == []


def test_inspect_json_and_wide(catalog: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    url, (a, _) = catalog
    code, out = _run(capsys, "inspect", a, "--catalog", url)
    assert code == 0
    default = json.loads(out)
    code, out = _run(capsys, "inspect", a, "-o", "json", "--catalog", url)
    assert json.loads(out) == default and default["claim"]["name"] == "train-data"
    code, out = _run(capsys, "inspect", a, "-o", "wide", "--catalog", url)
    lines = out.splitlines()
    assert code == 0
    fields = {k: v.strip() for k, _, v in (line.partition(":") for line in lines if not line.startswith(" "))}
    assert (fields["id"], fields["owner"], fields["epoch"], fields["pool"]) == (a, "node-a", "3", "rack-a")
    assert fields["source"] == "-" and fields["generations"] == "-"     # empty: shown as '-'
    i = lines.index("claim:")
    assert lines[i + 1:i + 4] == ["  name:      train-data", "  namespace: ml", f"  uid:       {UID}"]
    i = lines.index("capabilities:")
    assert lines[i + 1:i + 3] == ["  - access_type: mount", "    fs_type:     ext4"]
    code, out = _run(capsys, "inspect", "pvol-" + "0" * 32, "-o", "wide", "--catalog", url)
    assert code == 1 and "not found" in out


def _cli(argv: list[str], tty: bool) -> tuple[int, str, str]:
    """Run `csi-perssd ARGV` with stderr on a fresh pty (tty=True) or a pipe; (rc, stdout, stderr)."""
    cmd = [sys.executable, "-m", "csi_perssd.cli", *argv]
    if not tty:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return res.returncode, res.stdout, res.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    err = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:                # EIO: the child closed its side
            break
        if not data:
            break
        err += data
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(30), out, err.decode(errors="replace")


def test_gc_shows_progress_on_a_terminal_only(catalog: tuple[str, list[str]]) -> None:
    url, _ = catalog
    argv = ["gc", "--grace-seconds", "0", "--catalog", url, "--log-level", "warning"]
    rc, out_tty, err_tty = _cli(argv, tty=True)
    assert rc == 0, err_tty
    assert "\rgc: collecting [" in err_tty                # the status line, redrawn in place
    assert err_tty.endswith("\r")                         # and cleared at the end
    rc, out_pipe, err_pipe = _cli(argv, tty=False)
    assert rc == 0 and err_pipe == ""                     # quiet in a script
    assert out_pipe.startswith("deleted 0 chunks") and out_tty == out_pipe     # stdout: the same report
    rc, _, err_off = _cli(argv + ["--no-progress"], tty=True)
    assert rc == 0 and "collecting" not in err_off


def test_takeover_shows_progress_on_a_terminal_only(catalog: tuple[str, list[str]]) -> None:
    url, (a, _) = catalog
    rc, out, err = _cli(["takeover", a, "--from", "node-a", "--to", "node-b", "--catalog", url,
                         "--log-level", "error"], tty=True)
    assert rc == 0, err
    assert f"\rtakeover {a}: moving ownership from node-a to node-b" in err
    assert "epoch 4" in out
    rc, out, err = _cli(["takeover", a, "--from", "node-b", "--catalog", url, "--log-level", "error"], tty=False)
    assert rc == 0 and err == "" and "epoch 5" in out
