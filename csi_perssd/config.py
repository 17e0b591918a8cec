"""Driver configuration: one dataclass filled from flags / PERSSD_* environment variables."""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("all", "controller", "node")


@dataclass
class Config:
    mode: str = "all"
    endpoint: str = "unix:///tmp/csi-perssd.sock"
    node_id: str = ""
    pool: str = "default"
    pool_from_node_label: str = ""
    state_dir: str = "/var/lib/perssd/state"
    backend: str = "rawfile"
    rawfile_dir: str = "/var/lib/perssd/volumes"
    volume_group: str = ""
    thin_pool: str = "perssd-pool"
    lvm_config: str = ""                      # extra lvm --config (e.g. no udev inside a VM)
    max_volume_bytes: int = 0                 # 0 = no limit beyond capacity
    reserve_bytes: int = 0
    max_volumes_per_node: int = 256
    catalog: str = "file:///var/lib/perssd/catalog"
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_ca_bundle: str = ""
    encryption_key_file: str = ""             # fallback KEK (base64 of 32 bytes) for encrypted volumes
    metrics_address: str = ""
    log_level: str = "info"
    # 4 uploads in flight kept up with 8 and 16 against SeaweedFS on 2 cores (1 GiB: 141-148 vs
    # 133-135 MB/s) at 110 instead of 155 MiB of node RSS; each in flight holds ~2 chunk buffers
    flush_workers: int = 4
    # 8 GETs in flight, each into its own reused page-aligned buffer (ChunkFetcher): NodeStage of
    # 256 MiB from SeaweedFS on 2 cores, 4 alternating rounds each (benchmarks/stage_probe.py):
    # 0.44-0.58 s at 0.26-0.29 s node CPU with 8, 0.59-0.75 s at 0.31-0.32 s with 16, 0.40-0.63 s
    # with 4 (16 had been faster than 8 when each GET allocated its body and copied it once more)
    hydrate_workers: int = 8
    hydrate: str = "full"                     # default of the StorageClass parameter hydrate
    # lazy: parallel background fetches (0 = on demand only). 8, as hydrate_workers: 256 MiB
    # background-only from a warm spare on 2 cores, 4 runs each, alternating order: 0.69-0.74x of
    # the full hydrate with 8, 0.61-0.67x with 16 (more GIL-bound threads, no more bandwidth)
    lazy_background_workers: int = 8
    lazy_fetch_timeout_seconds: float = 60.0  # lazy: an on-demand read waits this long for S3, then EIO
    heartbeat_seconds: float = 30.0           # local tick: the node record is written only when it changes...
    node_refresh_seconds: float = 3600.0      # ...or this long after it was last written
    volume_check_seconds: float = 900.0       # one HEAD per local copy: was its volume deleted?
    wake_poll_seconds: float = 3.0            # HEAD of nodes/<node>.wake while volumes are staged here
    wake_idle_seconds: float = 60.0           # ... and while none is
    request_sweep_seconds: float = 900.0      # LIST requests/<node>/ anyway (a lost wake-up)
    gc_interval_seconds: float = 0.0          # 0 = no periodic GC in the controller
    gc_grace_seconds: float = 3600.0
    gc_keep_generations: int = 2
    grace_seconds: float = 30.0               # SIGTERM: time for in-flight RPCs
    freeze_timeout_seconds: float = 10.0
    unstage_wait_seconds: float = 20.0        # NodeUnstage waits this long for a flush before ABORTED
    enable_alpha: bool = False
    enable_snapshot_metadata: bool = False    # the SnapshotMetadata service (CSI alpha_service)
    # Events on the volume's PVC (events.py): auto = when running in a pod or with --kubeconfig
    pvc_events: str = "auto"                  # auto | on | off
    kubeconfig: str = ""                      # outside a pod: the API server to post events to
    events_progress_seconds: float = 15.0     # FlushProgress events at least this far apart
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def socket_path(self) -> str:
        if not self.endpoint.startswith("unix://"):
            raise ValueError(f"endpoint {self.endpoint!r} must be unix:///path")
        return self.endpoint[len("unix://"):]
