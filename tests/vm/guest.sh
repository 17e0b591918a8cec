#!/bin/bash
# Runs INSIDE the test VM (started by tests/vm/run.py): load modules, then the LVM pytest suite.
# Args: <work dir> [pytest args...]. Writes <work dir>/guest.rc; prints PERSSD-VM-BOOTED first.
set -u
work="$1"; shift
echo "PERSSD-VM-BOOTED $(cut -d' ' -f1 /proc/uptime)"
for m in loop dm_mod dm_thin_pool nvme; do
    modprobe "$m" || echo "guest: modprobe $m failed"
done
# The guest sees the host's /tmp through an overlay; give pytest its own tmpfs.
mkdir -p /tmp/perssd-vm && mount -t tmpfs -o size=512m perssd-vm-tmp /tmp/perssd-vm
export PERSSD_VM=1 LVM_SUPPRESS_FD_WARNINGS=1 TMPDIR=/tmp/perssd-vm PYTHONUNBUFFERED=1
export PATH="$PWD/.venv/bin:$PATH"
rc=0
.venv/bin/python -m pytest tests/lvm -p no:cacheprovider --junitxml="$work/junit.xml" \
    -o junit_family=xunit2 "$@" || rc=$?
umount /tmp/perssd-vm || true
echo "$rc" > "$work/guest.rc"
echo "PERSSD-VM-DONE rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
exit "$rc"
