"""The project's CSI conformance suite, written from ../shared/csi-spec/spec.md in csi-sanity's
layout: one file per service, one test per sentence of the spec.

- test_identity.py     Identity (GetPluginInfo, GetPluginCapabilities, Probe) and per-mode services
- test_controller.py   Controller RPCs: required fields, error tables, idempotency, pagination, topology
- test_node.py         Node RPCs on real loop devices, ext4/xfs and mounts; per-volume lock; hostile input
- test_persistence.py  persistence=object: flush on unstage, restage, move between nodes
- test_lifecycle.py    SIGKILL/restart recovery, graceful SIGTERM, RPC log lines, secrets never logged
- test_sanity_tool.py  tests/harness/sanity.py (`make sanity CSI_SANITY=...`)

Every test drives the real `csi-perssd serve` subprocess over a unix socket through the generated
stubs (fixtures in tests/plugins/driver.py). Run: `.venv/bin/python -m pytest tests/conformance -q`.
"""
