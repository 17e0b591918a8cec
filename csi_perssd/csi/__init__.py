"""Generated CSI v1.12.0 stubs (make proto)."""
