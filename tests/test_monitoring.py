"""deploy/monitoring: the PrometheusRule passes `promtool check rules`, each alert fires (and
stays quiet) on made-up series under `promtool test rules`, and every metric the dashboard and
the rules name is one a running driver really exports, read from its --metrics-address."""
from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.cluster import Cluster
from tests.harness.seaweed import Seaweed

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "perssd-rules.yaml"
DASHBOARD = MONITORING / "perssd-dashboard.json"
ALERTS = {"PerssdFlushFailing", "PerssdVolumeFencedWithUnflushedData", "PerssdPoolNearlyFull",
          "PerssdObjectStoreErrors"}
SELECTOR = re.compile(r"\b(perssd_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (make test installs it)", pytrace=False)
    return path


def _rule_file(tmp_path: Path) -> Path:
    doc = yaml.safe_load(RULES.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["metadata"]["namespace"] == "perssd-system"
    out = tmp_path / "perssd.rules.yml"
    out.write_text(yaml.safe_dump(doc["spec"]))
    return out


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    res = subprocess.run([_promtool(), "check", "rules", str(_rule_file(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in res.stdout
    assert {r["alert"] for r in _rules()} == ALERTS


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    doc = yaml.safe_load(RULES.read_text())
    doc["spec"]["groups"][0]["rules"][0]["expr"] = "max by (instance) (perssd_local_volumes{flush=failed}) > 0"
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(doc["spec"]))
    res = subprocess.run([_promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0


def _series(name: str, labels: str, values: str) -> dict[str, str]:
    return {"series": f'{name}{{instance="n1:9808",job="perssd",{labels}}}', "values": values}


# 1-minute samples; each alert fires on its series and not on the healthy ones
ALERT_TESTS: dict[str, Any] = {
    "interval": "1m",
    "input_series": [
        _series("perssd_local_volumes", 'flush="failed"', "0 1x30"),
        _series("perssd_local_volumes", 'flush="fenced"', "0 0 1x10"),
        _series("perssd_pool_bytes", 'kind="total"', "1000x40"),
        _series("perssd_pool_bytes", 'kind="available"', "500 50x40"),
        _series("perssd_pool_bytes", 'kind="cache"', "0 30x40"),
        _series("perssd_s3_requests_total", 'op="put"', "0+100x40"),
        _series("perssd_s3_errors_total", 'op="put"', "0 0 0 0 0+20x36"),
    ],
    "alert_rule_test": [
        {"eval_time": "10m", "alertname": "PerssdFlushFailing", "exp_alerts": []},
        {"eval_time": "20m", "alertname": "PerssdFlushFailing",
         "exp_alerts": [{"exp_labels": {"instance": "n1:9808", "severity": "warning"}}]},
        {"eval_time": "1m", "alertname": "PerssdVolumeFencedWithUnflushedData", "exp_alerts": []},
        {"eval_time": "4m", "alertname": "PerssdVolumeFencedWithUnflushedData",
         "exp_alerts": [{"exp_labels": {"instance": "n1:9808", "severity": "critical"}}]},
        {"eval_time": "10m", "alertname": "PerssdPoolNearlyFull", "exp_alerts": []},
        {"eval_time": "20m", "alertname": "PerssdPoolNearlyFull",
         "exp_alerts": [{"exp_labels": {"instance": "n1:9808", "job": "perssd", "severity": "warning"}}]},
        {"eval_time": "8m", "alertname": "PerssdObjectStoreErrors", "exp_alerts": []},
        {"eval_time": "25m", "alertname": "PerssdObjectStoreErrors",
         "exp_alerts": [{"exp_labels": {"instance": "n1:9808", "severity": "warning"}}]},
    ],
}


# the value each firing alert reports: volumes, free fraction (50 + 30 of 1000), error ratio
EXPECTED_VALUE = {"PerssdFlushFailing": "1", "PerssdVolumeFencedWithUnflushedData": "1",
                  "PerssdPoolNearlyFull": "8%", "PerssdObjectStoreErrors": "20%"}


def _expected_annotations(alert: str) -> dict[str, str]:
    rule = next(r for r in _rules() if r["alert"] == alert)
    out = {}
    for k, v in rule["annotations"].items():
        v = v.replace("{{ $labels.instance }}", "n1:9808")
        out[k] = re.sub(r"\{\{ \$value( \| humanizePercentage)? \}\}", EXPECTED_VALUE[alert], v)
    return out


def test_each_alert_fires_on_its_condition_only(tmp_path: Path) -> None:
    rules = _rule_file(tmp_path)
    tests = tmp_path / "alerts-test.yml"
    for t in ALERT_TESTS["alert_rule_test"]:
        for a in t["exp_alerts"]:
            a["exp_annotations"] = _expected_annotations(t["alertname"])
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m",
                                     "tests": [ALERT_TESTS]}))
    res = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert {t["alertname"] for t in ALERT_TESTS["alert_rule_test"]} == ALERTS


def test_dashboard_covers_what_operators_watch() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    text = " ".join(_dashboard_exprs())
    for needed in ('kind="uploaded"', 'kind="hydrated"', "perssd_transfer_duration_seconds_bucket",
                   "perssd_flush_backlog_bytes", "perssd_s3_requests_total", "perssd_s3_errors_total",
                   "perssd_s3_bytes_total", 'kind="cache"', 'flush="fenced"', 'flush="failed"',
                   "sum by (le, method) (rate(perssd_rpc_duration_seconds_bucket"):
        assert needed in text, f"the dashboard shows nothing of {needed}"


# -- metric names against a live driver -------------------------------------------------------
def _exported(port: int) -> dict[str, set[str]]:
    """Sample name -> label names, from the families the endpoint declares (with or without
    samples yet): a counter X as X_total, a histogram as X_bucket/_count/_sum."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("perssd_"):
            continue
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        for suffix in suffixes.get(fam.type, [""]):
            out[fam.name + suffix] = set(labels)
    return out


def _used(exprs: list[str]) -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for expr in exprs:
        for name, sel in SELECTOR.findall(expr):
            keys = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", sel or ""))
            used.setdefault(name, set()).update(keys - {"job", "instance", "namespace", "pod"})
    return used


@pytest.fixture(scope="module")
def node_metrics_port(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not seaweed.running:
        seaweed.start()
    cl = Cluster(tmp_path_factory.mktemp("mon"), nodes=("node-a",), seaweed=seaweed,
                 prefix=f"mon-{secrets.token_hex(5)}", metrics=True)
    try:
        cl.start()
        yield cl.metrics_ports["node-a"]
    finally:
        cl.stop()


def test_name_check_can_fail() -> None:
    exported = {"perssd_pool_bytes": {"kind"}}
    used = _used(['perssd_pool_bytes{kind="cache"} / perssd_pool_byte{kind="total"}',
                  'perssd_pool_bytes{knd="total"}'])
    assert set(used) - set(exported) == {"perssd_pool_byte"}
    assert used["perssd_pool_bytes"] - exported["perssd_pool_bytes"] == {"knd"}


@pytest.mark.root
@pytest.mark.s3
def test_every_metric_used_is_exported_by_a_running_driver(node_metrics_port: int) -> None:
    exported = _exported(node_metrics_port)
    used = _used(_dashboard_exprs() + [r["expr"] for r in _rules()])
    assert len(used) >= 10
    missing = sorted(set(used) - set(exported))
    assert not missing, f"used but not exported by the driver: {missing}; exported: {sorted(exported)}"
    for name, labels in used.items():
        if exported[name]:          # label names are known once the family has samples
            assert labels <= exported[name], f"{name}: labels {labels - exported[name]} do not exist"
    assert not (set(used) & PROMQL_WORDS)
