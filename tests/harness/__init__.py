"""Test, demo and benchmark harness: local SeaweedFS, driver processes, clusters of them,
scratch XFS pools, leftover cleanup, the csi-sanity runner and the proto generator.

Not shipped: the wheel and the image hold only csi_perssd/ (tests/test_wheel.py checks)."""
