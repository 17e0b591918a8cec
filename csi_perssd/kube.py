"""This node's pool, read from a label on its Kubernetes Node object.

In node mode with `--pool-from-node-label KEY` the driver asks the API server for its own Node
(`GET /api/v1/nodes/NAME`, RBAC: `get nodes`) and uses the label's value as its pool. The
operator sets it once per node: `kubectl label node NAME nvme.perssd.io/pool=rack-a`.
Every failure is a CsiError whose message names the node and the label, so a crash-looping
node plugin says exactly what to fix.
"""
from __future__ import annotations

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from . import ids
from .errors import CsiError, invalid, not_found, precondition, unavailable

DEFAULT_TIMEOUT_S = 10.0


def in_cluster_api_client() -> client.ApiClient:
    """An API client configured from the pod's service account (token, CA, KUBERNETES_SERVICE_*)."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException as e:
        raise unavailable(f"cannot configure the Kubernetes client from inside the pod "
                          f"(service account token and KUBERNETES_SERVICE_HOST are needed): {e}") from e
    cfg.retries = 2
    return client.ApiClient(cfg)


def api_client(kubeconfig: str = "") -> client.ApiClient:
    """An API client from a kubeconfig file, or (no file given) from the pod's service account."""
    if not kubeconfig:
        return in_cluster_api_client()
    cfg = client.Configuration()
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except (config.ConfigException, OSError, ValueError) as e:
        raise unavailable(f"cannot configure the Kubernetes client from {kubeconfig}: {e}") from e
    cfg.retries = 2
    return client.ApiClient(cfg)


def pool_from_node_label(node_name: str, label_key: str, *,
                         api_client: client.ApiClient | None = None,
                         timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Return the value of label `label_key` on Node `node_name`, validated as a pool name.

    `api_client` defaults to the in-cluster configuration. Raises CsiError: NOT_FOUND when the
    Node does not exist, FAILED_PRECONDITION when the label is missing or empty, or when the
    service account may not read the Node, INVALID_ARGUMENT when the value is not a valid pool
    name, UNAVAILABLE when the API server cannot be reached.
    """
    ids.node_id(node_name)
    if not label_key or not label_key.strip():
        raise invalid("--pool-from-node-label needs a label key, e.g. nvme.perssd.io/pool")
    owned = api_client is None
    api = api_client if api_client is not None else in_cluster_api_client()
    try:
        node = _read_node(api, node_name, label_key, timeout)
    finally:
        if owned:
            api.close()
    labels = (node.metadata.labels if node.metadata else None) or {}
    value = labels.get(label_key, "")
    if not value:
        raise precondition(f"node {node_name!r} has no label {label_key!r}: label it with "
                           f"`kubectl label node {node_name} {label_key}=<pool>` "
                           f"or start the driver with --pool instead")
    try:
        return ids.pool_name(value)
    except CsiError as e:
        raise invalid(f"label {label_key!r} on node {node_name!r} is not a valid pool name: "
                      f"{e.message}") from e


def _read_node(api: client.ApiClient, node_name: str, label_key: str,
               timeout: float) -> client.V1Node:
    where = f"node {node_name!r} (for its label {label_key!r})"
    try:
        return client.CoreV1Api(api).read_node(node_name, _request_timeout=timeout)
    except ApiException as e:
        if e.status == 404:
            raise not_found(f"cannot read {where}: the Node does not exist; "
                            f"is --node-id the Kubernetes node name (spec.nodeName)?") from e
        if e.status in (401, 403):
            raise precondition(f"cannot read {where}: the API server answered {e.status} "
                               f"{e.reason}; the node plugin's service account needs "
                               f"`get` on `nodes`") from e
        raise unavailable(f"cannot read {where}: the API server answered {e.status} "
                          f"{e.reason}") from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise unavailable(f"cannot read {where}: the Kubernetes API server is unreachable "
                          f"at {api.configuration.host}: {e}") from e
