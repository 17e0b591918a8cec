"""csi-perssd: local NVMe CSI volumes that outlive the node through S3 object storage."""
from importlib import metadata as _metadata

DRIVER_NAME = "nvme.perssd.io"
TOPOLOGY_NODE_KEY = "nvme.perssd.io/node"
TOPOLOGY_POOL_KEY = "nvme.perssd.io/pool"

try:
    __version__ = _metadata.version("csi-perssd")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
