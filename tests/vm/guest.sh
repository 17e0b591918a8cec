#!/bin/bash
# Runs INSIDE the test VM (started by tests/vm/run.py): load modules, then the LVM pytest suite.
# Args: <work dir> <pytest args: selection and options> | --script <file.py> <its args>. Writes <work dir>/guest.rc; prints PERSSD-VM-BOOTED first.
set -u
work="$1"; shift
echo "PERSSD-VM-BOOTED $(cut -d' ' -f1 /proc/uptime)"
for m in loop dm_mod dm_thin_pool nvme fuse; do
    modprobe "$m" || echo "guest: modprobe $m failed"
done
# S3 runs on the host (tests/vm/run.py): QEMU user networking, guest 10.0.2.15, host 10.0.2.2.
ip link set lo up
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
if [ -n "$nic" ]; then
    ip link set "$nic" up && ip addr add 10.0.2.15/24 dev "$nic" || echo "guest: network setup failed"
fi
if [ -f "$work/s3.env" ]; then set -a; . "$work/s3.env"; set +a; fi
# The guest sees the host's /tmp through an overlay; give pytest its own tmpfs.
mkdir -p /tmp/perssd-vm && mount -t tmpfs -o size=512m perssd-vm-tmp /tmp/perssd-vm
# PERSSD_VM_WORK: on the host (shared read-write): logs a failing test keeps outlive the VM
export PERSSD_VM=1 PERSSD_VM_WORK="$work" LVM_SUPPRESS_FD_WARNINGS=1 TMPDIR=/tmp/perssd-vm PYTHONUNBUFFERED=1
export PATH="$PWD/.venv/bin:$PATH"
rc=0
if [ "${1:-}" = "--script" ]; then      # tests/vm/run.py --script: a benchmark, not the suite
    shift; script="$1"; shift
    .venv/bin/python "$script" "$@" || rc=$?
else
    .venv/bin/python -m pytest -p no:cacheprovider --junitxml="$work/junit.xml" \
        -o junit_family=xunit2 "$@" || rc=$?
fi
umount /tmp/perssd-vm || true
echo "$rc" > "$work/guest.rc"
echo "PERSSD-VM-DONE rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
exit "$rc"
