"""Device-mapper ioctls through libdevmapper (lvm2's own library, the one `dmsetup` is a thin
command line over), called in process with ctypes.

Why not `dmsetup`: under emulation (the VM rig) every dmsetup run costs 0.1-0.3 s of process
start against ~15 ms for the same ioctl from here, and a lazy NodeStage or the switch at the end
of its hydration makes one to four of them. Only what the lazy path needs is bound: create (with
its table), reload, suspend, resume, remove, and the table or status of a device.

udev: operations run without udev synchronisation (what `dmsetup --noudevsync` does); callers
that need the /dev/mapper node make it themselves when neither udev nor the library did
(lazy/dm.py). Errors are CsiError(INTERNAL) carrying the operation, the device name and errno.
"""
from __future__ import annotations

import ctypes
import errno as errno_mod
import functools
import os
import threading
from dataclasses import dataclass

from ..errors import Code, CsiError

LIBRARY = "libdevmapper.so.1.02.1"

# enum in libdevmapper.h (stable ABI since 1.02)
_CREATE, _RELOAD, _REMOVE, _SUSPEND, _RESUME, _STATUS, _TABLE = 0, 1, 2, 4, 5, 10, 11
_MU = threading.Lock()          # libdevmapper keeps global state (udev sync flag, node ops)


@dataclass(frozen=True)
class Target:
    """One line of a device's table (or status): sectors [start, start + length) -> params."""
    start: int
    length: int
    kind: str
    params: str

    def line(self) -> str:
        return f"{self.start} {self.length} {self.kind} {self.params}"


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError:
        return None
    vp, u64, cp = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p
    lib.dm_task_create.restype, lib.dm_task_create.argtypes = vp, [ctypes.c_int]
    lib.dm_task_destroy.restype, lib.dm_task_destroy.argtypes = None, [vp]
    lib.dm_task_set_name.restype, lib.dm_task_set_name.argtypes = ctypes.c_int, [vp, cp]
    lib.dm_task_add_target.restype, lib.dm_task_add_target.argtypes = ctypes.c_int, [vp, u64, u64, cp, cp]
    lib.dm_task_run.restype, lib.dm_task_run.argtypes = ctypes.c_int, [vp]
    lib.dm_get_next_target.restype = vp
    lib.dm_get_next_target.argtypes = [vp, vp, ctypes.POINTER(u64), ctypes.POINTER(u64),
                                       ctypes.POINTER(cp), ctypes.POINTER(cp)]
    lib.dm_udev_set_sync_support.restype, lib.dm_udev_set_sync_support.argtypes = None, [ctypes.c_int]
    lib.dm_udev_set_sync_support(0)
    return lib


def available() -> bool:
    """libdevmapper can be loaded (the kernel side is dm.available()'s to tell)."""
    return _lib() is not None


def _run(op: int, what: str, name: str, table: list[Target] | None = None) -> list[Target]:
    """One dm task on device `name`; the targets it returns (status and table only)."""
    lib = _lib()
    if lib is None:
        raise CsiError(Code.INTERNAL, f"{what} {name}: {LIBRARY} cannot be loaded (install libdevmapper1.02.1)")
    with _MU:
        task = lib.dm_task_create(op)
        if not task:
            raise CsiError(Code.INTERNAL, f"{what} {name}: libdevmapper cannot make a task")
        try:
            if not lib.dm_task_set_name(task, name.encode()):
                raise CsiError(Code.INTERNAL, f"{what} {name}: the name is refused")
            for t in table or []:
                if not lib.dm_task_add_target(task, t.start, t.length, t.kind.encode(), t.params.encode()):
                    raise CsiError(Code.INTERNAL, f"{what} {name}: target {t.line()!r} is refused")
            ctypes.set_errno(0)
            if not lib.dm_task_run(task):
                err = ctypes.get_errno()
                why = f"{errno_mod.errorcode.get(err, err)} ({os.strerror(err)})" if err else "failed"
                code = Code.NOT_FOUND if err == errno_mod.ENXIO else Code.INTERNAL
                raise CsiError(code, f"{what} {name}: {why}")
            out: list[Target] = []
            if op in (_STATUS, _TABLE):
                nxt: int | None = None
                start, length = ctypes.c_uint64(), ctypes.c_uint64()
                kind, params = ctypes.c_char_p(), ctypes.c_char_p()
                while True:
                    nxt = lib.dm_get_next_target(task, nxt, ctypes.byref(start), ctypes.byref(length),
                                                 ctypes.byref(kind), ctypes.byref(params))
                    if kind.value is not None:
                        out.append(Target(start.value, length.value, kind.value.decode(),
                                          (params.value or b"").decode(errors="replace")))
                    if not nxt:
                        break
            return out
        finally:
            lib.dm_task_destroy(task)


def create(name: str, table: list[Target]) -> None:
    """A new, active device `name` with `table` (EEXIST when one of that name exists)."""
    _run(_CREATE, "dm create", name, table)


def reload(name: str, table: list[Target]) -> None:
    """Load `table` into the device's inactive slot (a resume makes it live)."""
    _run(_RELOAD, "dm reload", name, table)


def suspend(name: str) -> None:
    """Hold new I/O and flush what is in flight (the file system on it is frozen first)."""
    _run(_SUSPEND, "dm suspend", name)


def resume(name: str) -> None:
    """Swap in the loaded table, if any, and let I/O go on."""
    _run(_RESUME, "dm resume", name)


def remove(name: str) -> None:
    _run(_REMOVE, "dm remove", name)


def table(name: str) -> list[Target]:
    return _run(_TABLE, "dm table", name)


def status(name: str) -> list[Target]:
    return _run(_STATUS, "dm status", name)
