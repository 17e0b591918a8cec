"""Boot ONE test VM (virtme-ng, QEMU TCG) and run the LVM suite (tests/lvm) inside it.

    python tests/vm/run.py [--check] [--kernel /boot/vmlinuz-X] [-- pytest args]
    python tests/vm/run.py --script benchmarks/lazy_dm.py [-- script args]   (a benchmark)

The guest runs the host's own root file system read-only (9p) with the project directory
shared read-write, so it uses the host venv. Two emulated NVMe disks (`-device nvme`, sparse
images under tests/vm/.work/) give devices.py real namespaces: nvme0n1 (24 GiB: room for the bench's 16 GiB volume) for the thin
pool, nvme1n1 (2 GiB) for the `pool init` refusal tests. Output goes to the terminal and to
tests/vm/.work/vm.log, JUnit XML to tests/vm/.work/junit.xml; the exit code is the suite's.
KVM stays off on purpose: nested KVM on the CI machines cannot boot a Debian kernel.

`--check` only tells (exit 0/1) whether everything the VM needs is installed; nothing is run.
Packages (installed by `make test-lvm`): qemu-system-x86 linux-image-amd64 busybox-static lvm2
thin-provisioning-tools, and virtme-ng in the venv.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "tests" / "vm" / ".work"
DISKS = (("nvme0.img", 24 << 30, "perssd-test0"), ("nvme1.img", 2 << 30, "perssd-test1"))


def newest_kernel() -> str | None:
    def key(p: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", p)]
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=key)
    return found[-1] if found else None


def problems(kernel: str | None) -> list[str]:
    venv_bin = Path(sys.executable).parent
    out = []
    if not (venv_bin / "vng").exists():
        out.append(f"vng not found in {venv_bin} (pip install virtme-ng)")
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static"),
                      ("lvm", "lvm2"), ("thin_delta", "thin-provisioning-tools")):
        if shutil.which(tool) is None:
            out.append(f"{tool} not found (apt-get install {pkg})")
    if kernel is None:
        out.append("no kernel in /boot (apt-get install linux-image-amd64)")
    else:
        ver = Path(kernel).name.removeprefix("vmlinuz-")
        if not Path(f"/lib/modules/{ver}/modules.dep").exists():
            out.append(f"modules of {ver} missing (/lib/modules/{ver}/modules.dep)")
        if not os.access(kernel, os.R_OK):
            out.append(f"{kernel} is not readable")
    return out


def make_disks() -> list[str]:
    opts = []
    for i, (name, size, serial) in enumerate(DISKS):
        img = WORK / name
        img.unlink(missing_ok=True)               # a fresh, empty disk every run
        with open(img, "wb") as f:
            f.truncate(size)
        opts += [f"-drive file={img},if=none,id=nvm{i},format=raw,cache=unsafe",
                 f"-device nvme,serial={serial},drive=nvm{i}"]
    return opts


def vng_argv(kernel: str, qemu_opts: list[str], pytest_args: list[str], cpus: int,
             memory: str, network: bool) -> list[str]:
    vng = str(Path(sys.executable).parent / "vng")
    guest = ["bash", "tests/vm/guest.sh", str(WORK), *pytest_args]
    return [vng, "--run", kernel, "--user", "root", "--force-9p", "--disable-kvm",
            "--memory", memory, "--cpus", str(cpus), f"--rwdir={ROOT}", "--cwd", str(ROOT),
            "-a", "mitigations=off modprobe.blacklist=kvm,kvm_amd,kvm_intel",
            *(["--network", "user", "--no-dhcp"] if network else []),
            f"--qemu-opts={' '.join(qemu_opts)}", "--", *guest]


def start_s3() -> object:
    """SeaweedFS on the host's loopback; the guest reaches it at 10.0.2.2 (QEMU user network).

    Running it inside the TCG guest is too slow (not ready within minutes on a loaded host)."""
    sys.path.insert(0, str(ROOT))
    from tests.harness.seaweed import Seaweed
    sw = Seaweed(WORK / "seaweed")
    sw.start()
    env = WORK / "s3.env"
    env.unlink(missing_ok=True)
    fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"PERSSD_VM_S3_ENDPOINT=http://10.0.2.2:{sw.ports['s3.port']}\n"
                f"PERSSD_VM_S3_BUCKET={sw.bucket}\n"
                f"PERSSD_VM_S3_ACCESS_KEY={sw.access_key}\n"
                f"PERSSD_VM_S3_SECRET_KEY={sw.secret_key}\n"
                f"PERSSD_HOST_LOADAVG='{' '.join(open('/proc/loadavg').read().split()[:3])}'\n")
    return sw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the VM can run")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--timeout", type=float, default=1500, help="kill the VM after this many seconds")
    ap.add_argument("--script", default=None, help="run this Python script in the guest, not pytest")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest (or --script) arguments (after --)")
    args = ap.parse_args(argv)
    kernel = args.kernel or newest_kernel()
    missing = problems(kernel)
    if missing:
        for m in missing:
            print(f"test VM cannot run: {m}", file=sys.stderr)
        return 1 if args.check else 2
    if args.check:
        print(f"test VM can run: {kernel}")
        return 0
    assert kernel is not None
    WORK.mkdir(parents=True, exist_ok=True)
    for stale in ("guest.rc", "junit.xml"):
        (WORK / stale).unlink(missing_ok=True)
    shutil.rmtree(WORK / "seaweed", ignore_errors=True)
    t_s3 = time.monotonic()
    sw = start_s3()
    print(f"test VM: SeaweedFS on the host ready in {time.monotonic() - t_s3:.1f}s")
    try:
        return run_vm(args, kernel)
    finally:
        sw.stop()                                   # type: ignore[attr-defined]
        (WORK / "s3.env").unlink(missing_ok=True)
        shutil.rmtree(WORK / "seaweed", ignore_errors=True)


def run_vm(args: argparse.Namespace, kernel: str) -> int:
    pytest_args = list(args.pytest_args)
    if args.script:
        pytest_args = ["--script", args.script, *pytest_args]
    elif not any(a.startswith("tests/") for a in pytest_args):
        pytest_args.insert(0, "tests/lvm")
    argv_ = vng_argv(kernel, make_disks(), pytest_args, args.cpus, args.memory, network=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    t0 = time.monotonic()
    booted = None
    # vng hands qemu /proc/self/fd/1 which qemu reopens with O_TRUNC: read through a pipe.
    proc = subprocess.Popen(argv_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    timed_out = False

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal timed_out
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout))
    with open(WORK / "vm.log", "wb") as log:
        while True:
            data = proc.stdout.read1(65536)     # not line by line: pytest's dots have no newline
            if not data:
                break
            log.write(data)
            log.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            if booted is None and b"PERSSD-VM-BOOTED" in data:
                booted = time.monotonic() - t0
    rc = proc.wait()
    signal.alarm(0)
    total = time.monotonic() - t0
    rc_file = WORK / "guest.rc"
    guest_rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
    for name, _, _ in DISKS:
        (WORK / name).unlink(missing_ok=True)
    boot = f"{booted:.1f}s" if booted is not None else "never"
    print(f"test VM: boot {boot}, suite {total - (booted or 0):.1f}s, total {total:.1f}s, "
          f"vng exit {rc}, guest suite exit {guest_rc}"
          + (f" (killed after {args.timeout:.0f}s)" if timed_out else ""))
    if guest_rc is None:
        print("test VM: the suite did not finish (no guest.rc); see tests/vm/.work/vm.log",
              file=sys.stderr)
        return 1
    return guest_rc or (rc if rc != 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
