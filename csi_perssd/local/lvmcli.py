"""Typed wrapper around lvm2, dmsetup and thin-provisioning-tools: nothing else runs them.

Commands are argv lists; every lvm query uses `--reportformat json --units b --nosuffix` and is
parsed into dataclasses; thin_delta/thin_dump XML is parsed with ElementTree. A failing command
raises CsiError carrying the tool's stderr: NOT_FOUND for missing VGs/LVs, RESOURCE_EXHAUSTED
for space problems, INTERNAL otherwise.

`config` is passed to every lvm command as `--config`; production leaves it None (udev manages
/dev), the VM test rig passes NO_UDEV_CONFIG because its guest has no udev rules for lvm.
"""
from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ..errors import Code, CsiError, internal
from . import proc

log = logging.getLogger(__name__)

# For hosts without udev rules for lvm and without dmeventd (the test VM): lvm creates the /dev
# nodes itself and does not try to start thin-pool monitoring.
NO_UDEV_CONFIG = ("activation{udev_sync=0 udev_rules=0 monitoring=0} "
                  "devices{obtain_device_list_from_udev=0}")

LV_FIELDS = ("lv_name", "vg_name", "lv_path", "lv_dm_path", "lv_size", "lv_tags", "lv_attr",
             "segtype", "pool_lv", "origin", "thin_id", "data_percent", "metadata_percent",
             "chunk_size", "lv_active", "lv_device_open", "zero", "lv_metadata_size", "vg_extent_size")
VG_FIELDS = ("vg_name", "vg_size", "vg_free", "vg_extent_size", "pv_count", "lv_count", "vg_tags")
PV_FIELDS = ("pv_name", "vg_name", "pv_size", "pv_free")

_NOT_FOUND = ("not found", "failed to find", "cannot process volume group")
_EXHAUSTED = ("insufficient free space", "insufficient suitable", "out of data space",
              "would exceed", "free space in thin pool", "not enough free")


@dataclass(frozen=True)
class LvInfo:
    name: str
    vg: str
    path: str
    dm_path: str
    size: int
    tags: tuple[str, ...]
    attr: str
    segtype: str
    pool_lv: str
    origin: str
    thin_id: int | None
    data_percent: float | None
    metadata_percent: float | None
    chunk_size: int
    active: bool
    open: bool
    zero: bool
    metadata_size: int
    extent_size: int = 0        # the VG's (LV sizes are whole extents)

    @property
    def hidden(self) -> bool:
        return self.name.startswith("[")


@dataclass(frozen=True)
class VgInfo:
    name: str
    size: int
    free: int
    extent_size: int
    pv_count: int
    lv_count: int
    tags: tuple[str, ...]


@dataclass(frozen=True)
class PvInfo:
    name: str
    vg: str
    size: int
    free: int


@dataclass(frozen=True)
class ThinRange:
    """A run of thin-device blocks [begin, begin+length) in units of the pool's chunk size."""
    begin: int
    length: int
    kind: str = "mapped"        # thin_delta: different | left_only | right_only | same


def _int(v: str) -> int:
    return int(v) if v not in ("", None) else 0


def _float(v: str) -> float | None:
    return float(v) if v not in ("", None) else None


def _tags(v: str) -> tuple[str, ...]:
    return tuple(t for t in v.split(",") if t)


def dm_name(vg: str, lv: str) -> str:
    """Device-mapper name of vg/lv: dashes inside each part are doubled, joined by one dash."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


_IN_USE = ("in use", "contains a filesystem in use", "device or resource busy")


def classify(stderr: str) -> Code:
    low = stderr.lower()
    if any(s in low for s in _IN_USE):
        return Code.FAILED_PRECONDITION
    if any(s in low for s in _EXHAUSTED):
        return Code.RESOURCE_EXHAUSTED
    if any(s in low for s in _NOT_FOUND):
        return Code.NOT_FOUND
    return Code.INTERNAL


def _clean(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines()
             if ln.strip() and "leaked on" not in ln and "File descriptor" not in ln]
    return "; ".join(lines)[:2000]


class ToolRunner:
    """Runs one external command; raises CsiError with the tool's stderr when it fails."""

    def __init__(self, timeout_s: float = 300.0):
        self.timeout_s = timeout_s
        self.env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1", LC_ALL="C")

    def run(self, argv: list[str], *, what: str = "") -> str:
        return proc.run(argv, timeout=self.timeout_s, env=self.env, what=what or None, classify=classify,
                        clean=_clean, missing=Code.FAILED_PRECONDITION).stdout


class LvmCli:
    """The lvm2 command set the backend and `pool init` use."""

    def __init__(self, config: str | None = None, runner: ToolRunner | None = None,
                 lvm: str = "lvm"):
        self.config = config
        self.runner = runner or ToolRunner()
        self.lvm = lvm

    # -- plumbing -----------------------------------------------------------------------------
    def run(self, cmd: str, *args: str, what: str = "") -> str:
        argv = [self.lvm, cmd]
        if self.config:
            argv += ["--config", self.config]
        return self.runner.run(argv + list(args), what=what or f"lvm {cmd}")

    def _report(self, cmd: str, key: str, fields: tuple[str, ...], *args: str) -> list[dict[str, str]]:
        out = self.run(cmd, "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", ",".join(fields), *args)
        try:
            doc = json.loads(out)
            rows: list[dict[str, str]] = []
            for part in doc.get("report", []):
                rows.extend(part.get(key, []))
            return rows
        except (ValueError, AttributeError) as e:
            raise internal(f"lvm {cmd}: cannot parse JSON report ({e}): {out[:300]!r}") from None

    # -- queries ------------------------------------------------------------------------------
    def lvs(self, vg: str, *, all_lvs: bool = False) -> list[LvInfo]:
        args = ["-a"] if all_lvs else []
        rows = self._report("lvs", "lv", LV_FIELDS, *args, vg)
        return [LvInfo(name=r["lv_name"], vg=r["vg_name"], path=r["lv_path"],
                       dm_path=r["lv_dm_path"], size=_int(r["lv_size"]), tags=_tags(r["lv_tags"]),
                       attr=r["lv_attr"], segtype=r["segtype"], pool_lv=r["pool_lv"],
                       origin=r["origin"], thin_id=int(r["thin_id"]) if r["thin_id"] else None,
                       data_percent=_float(r["data_percent"]),
                       metadata_percent=_float(r["metadata_percent"]),
                       chunk_size=_int(r["chunk_size"]), active=r["lv_active"] == "active",
                       open=r["lv_device_open"] == "open", zero=r["zero"] == "zero",
                       metadata_size=_int(r["lv_metadata_size"]),
                       extent_size=_int(r.get("vg_extent_size", "")))
                for r in rows]

    def vgs(self, *vgs: str) -> list[VgInfo]:
        rows = self._report("vgs", "vg", VG_FIELDS, *vgs)
        return [VgInfo(name=r["vg_name"], size=_int(r["vg_size"]), free=_int(r["vg_free"]),
                       extent_size=_int(r["vg_extent_size"]), pv_count=_int(r["pv_count"]),
                       lv_count=_int(r["lv_count"]), tags=_tags(r["vg_tags"])) for r in rows]

    def vg(self, name: str) -> VgInfo | None:
        try:
            found = self.vgs(name)
        except CsiError as e:
            if e.code == Code.NOT_FOUND:
                return None
            raise
        return found[0] if found else None

    def pvs(self) -> list[PvInfo]:
        rows = self._report("pvs", "pv", PV_FIELDS)
        return [PvInfo(name=r["pv_name"], vg=r["vg_name"], size=_int(r["pv_size"]),
                       free=_int(r["pv_free"])) for r in rows]


class DmCli:
    """dmsetup and the thin_* tools, for metadata snapshots and block maps."""

    def __init__(self, runner: ToolRunner | None = None):
        self.runner = runner or ToolRunner()

    def message(self, dm: str, msg: str) -> None:
        self.runner.run(["dmsetup", "message", dm, "0", msg], what=f"dmsetup message {msg}")

    def message_status(self, dm: str, msg: str) -> tuple[int, str]:
        """Like message() but returns (exit code, stderr) instead of raising."""
        rc, _, err = proc.status(["dmsetup", "message", dm, "0", msg], env=self.runner.env,
                                 timeout=self.runner.timeout_s)
        return rc, _clean(err)

    def thin_delta(self, tmeta: str, thin1: int, thin2: int) -> list[ThinRange]:
        out = self.runner.run(["thin_delta", "--metadata-snap", "--thin1", str(thin1),
                               "--thin2", str(thin2), tmeta], what="thin_delta")
        return parse_thin_delta(out)

    def thin_dump(self, tmeta: str, dev_id: int) -> list[ThinRange]:
        out = self.runner.run(["thin_dump", "--metadata-snap", "--dev-id", str(dev_id), tmeta],
                              what="thin_dump")
        return parse_thin_dump(out, dev_id)


def _xml(text: str, tool: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise internal(f"{tool}: cannot parse output ({e}): {text[:300]!r}") from None


def parse_thin_delta(text: str) -> list[ThinRange]:
    """thin_delta (0.9, terse or --verbose) XML -> ranges of every kind, in output order."""
    root = _xml(text, "thin_delta")
    out: list[ThinRange] = []
    for diff in root.iter("diff"):
        for el in diff:
            kind = el.tag
            if el.get("begin") is not None:
                out.append(ThinRange(int(el.get("begin", "0")), int(el.get("length", "0")), kind))
            for sub in el.iter("range"):        # --verbose form: <kind><range .../></kind>
                out.append(ThinRange(int(sub.get("begin", "0")), int(sub.get("length", "0")), kind))
    return out


def parse_thin_dump(text: str, dev_id: int) -> list[ThinRange]:
    """Mapped virtual blocks of thin device `dev_id` from thin_dump XML."""
    root = _xml(text, "thin_dump")
    out: list[ThinRange] = []
    for dev in root.iter("device"):
        if int(dev.get("dev_id", "-1")) != dev_id:
            continue
        for el in dev:
            if el.tag == "single_mapping":
                out.append(ThinRange(int(el.get("origin_block", "0")), 1))
            elif el.tag == "range_mapping":
                out.append(ThinRange(int(el.get("origin_begin", "0")), int(el.get("length", "0"))))
    return out

