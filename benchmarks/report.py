"""Aggregate benchmark runs: medians with min/max, per-run ratios, targets, markdown."""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

MiB = 1 << 20

# (key, label, unit): figures shown in the table; key is "<section>.<field>"
FIGURES: list[tuple[str, str, str]] = [
    ("flush_a.mb_s", "driver flush (a) random", "MB/s"),
    ("s5cmd_upload_a.mb_s", "s5cmd cp upload (a)", "MB/s"),
    ("rclone_upload_a.mb_s", "rclone copy upload (a)", "MB/s"),
    ("restic_first_a.mb_s", "restic backup first (a)", "MB/s"),
    ("hydrate_a.mb_s", "driver hydrate (a)", "MB/s"),
    ("s5cmd_download_a.mb_s", "s5cmd cp download (a)", "MB/s"),
    ("s5cmd_download_synced_a.mb_s", "s5cmd cp download (a) + fsync", "MB/s"),
    ("rclone_download_a.mb_s", "rclone copy download (a)", "MB/s"),
    ("flush_b.mb_s", "driver flush (b) ext4 40% mix", "MB/s"),
    ("s5cmd_upload_b.mb_s", "s5cmd cp upload (b) raw image", "MB/s"),
    ("rclone_upload_b.mb_s", "rclone copy upload (b) raw image", "MB/s"),
    ("restic_first_b.mb_s", "restic backup first (b)", "MB/s"),
    ("hydrate_b.mb_s", "driver hydrate (b)", "MB/s"),
    ("s5cmd_download_b.mb_s", "s5cmd cp download (b)", "MB/s"),
    ("rclone_download_b.mb_s", "rclone copy download (b)", "MB/s"),
    ("flush_a_ctl.mb_s", "driver flush (a), unencrypted control next to the encrypted one", "MB/s"),
    ("flush_a_enc.mb_s", "driver flush (a), encryption aes-256-gcm", "MB/s"),
    ("hydrate_a_ctl.mb_s", "driver hydrate (a), unencrypted control", "MB/s"),
    ("hydrate_a_enc.mb_s", "driver hydrate (a), encryption aes-256-gcm", "MB/s"),
    ("flush_b_ctl.mb_s", "driver flush (b), unencrypted control", "MB/s"),
    ("flush_b_enc.mb_s", "driver flush (b), encryption aes-256-gcm", "MB/s"),
    ("hydrate_b_ctl.mb_s", "driver hydrate (b), unencrypted control", "MB/s"),
    ("hydrate_b_enc.mb_s", "driver hydrate (b), encryption aes-256-gcm", "MB/s"),
    ("flush_a_ctl.cpu_seconds", "node CPU, flush (a) unencrypted control", "s"),
    ("flush_a_enc.cpu_seconds", "node CPU, flush (a) encrypted", "s"),
    ("hydrate_a_ctl.cpu_seconds", "node CPU, hydrate (a) unencrypted control", "s"),
    ("hydrate_a_enc.cpu_seconds", "node CPU, hydrate (a) encrypted", "s"),
    ("flush_b_ctl.cpu_seconds", "node CPU, flush (b) unencrypted control", "s"),
    ("flush_b_enc.cpu_seconds", "node CPU, flush (b) encrypted", "s"),
    ("hydrate_b_ctl.cpu_seconds", "node CPU, hydrate (b) unencrypted control", "s"),
    ("hydrate_b_enc.cpu_seconds", "node CPU, hydrate (b) encrypted", "s"),
    ("flush_a.pre_flush_seconds", "driver flush (a): pre-flush pass", "s"),
    ("flush_a.final_pass_seconds", "driver flush (a): final pass", "s"),
    ("flush_b.pre_flush_seconds", "driver flush (b): pre-flush pass", "s"),
    ("flush_b.final_pass_seconds", "driver flush (b): final pass", "s"),
    ("flush_c.seconds", "driver incremental flush (c)", "s"),
    ("flush_c.pre_flush_seconds", "driver flush (c): pre-flush pass", "s"),
    ("flush_c.final_pass_seconds", "driver flush (c): final pass", "s"),
    ("restic_incremental_c.seconds", "restic incremental backup (c)", "s"),
    ("flush_c.uploaded_bytes", "driver uploaded (c)", "MiB"),
    ("flush_c.changed_chunk_bytes", "changed chunks (c)", "MiB"),
    ("restic_incremental_c.data_added_bytes", "restic added (c)", "MiB"),
    ("restage_cached.seconds", "cached re-stage", "s"),
    ("reflush_b_unchanged.seconds", "driver flush of unchanged (b)", "s"),
    ("flush_a.uploaded_bytes", "driver uploaded (a)", "MiB"),
    ("flush_b.uploaded_bytes", "driver uploaded (b)", "MiB"),
    ("flush_b.read_bytes", "driver read (b), pre-flush + final", "MiB"),
    ("restic_first_b.data_added_bytes", "restic added (b)", "MiB"),
    ("flush_a.s3_requests", "driver S3 requests, flush (a)", ""),
    ("flush_b.s3_requests", "driver S3 requests, flush (b)", ""),
    ("flush_c.s3_requests", "driver S3 requests, flush (c)", ""),
    ("hydrate_a.s3_requests", "driver S3 requests, hydrate (a)", ""),
    ("flush_a.cpu_seconds", "node CPU, flush (a)", "s"),
    ("s5cmd_upload_a.cpu_seconds", "s5cmd CPU, upload (a)", "s"),
    ("flush_b.cpu_seconds", "node CPU, flush (b)", "s"),
    ("hydrate_a.cpu_seconds", "node CPU, hydrate (a)", "s"),
    ("flush_c.cpu_seconds", "node CPU, flush (c)", "s"),
    ("restic_incremental_c.cpu_seconds", "restic CPU, incremental (c)", "s"),
    ("flush_a.peak_rss_bytes", "node peak RSS, flush (a)", "MiB"),
    ("flush_b.peak_rss_bytes", "node peak RSS, flush (b)", "MiB"),
    ("hydrate_a.peak_rss_bytes", "node peak RSS, hydrate (a)", "MiB"),
    ("s5cmd_upload_a.peak_rss_bytes", "s5cmd peak RSS, upload (a)", "MiB"),
    ("rclone_upload_a.peak_rss_bytes", "rclone peak RSS, upload (a)", "MiB"),
    ("restic_first_a.peak_rss_bytes", "restic peak RSS, first (a)", "MiB"),
]


def _get(run: dict[str, Any], key: str) -> float | None:
    sec, _, fld = key.partition(".")
    v = run.get(sec, {}).get(fld) if isinstance(run.get(sec), dict) else None
    return float(v) if v is not None else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# the encryption ratios: (which, numerator, denominator), taken inside each control/encrypted
# pair of a run (run["enc_pairs_a"], ["enc_pairs_b"]; results without pairs: the run itself)
ENC_RATIOS: dict[str, tuple[str, str, str]] = {
    "flush_a_enc_vs_plain": ("a", "flush_a_ctl.seconds", "flush_a_enc.seconds"),
    "hydrate_a_enc_vs_plain": ("a", "hydrate_a_ctl.seconds", "hydrate_a_enc.seconds"),
    "flush_b_enc_vs_plain": ("b", "flush_b_ctl.seconds", "flush_b_enc.seconds"),
    "hydrate_b_enc_vs_plain": ("b", "hydrate_b_ctl.seconds", "hydrate_b_enc.seconds"),
    "flush_a_enc_cpu_vs_plain": ("a", "flush_a_ctl.cpu_seconds", "flush_a_enc.cpu_seconds"),
    "hydrate_a_enc_cpu_vs_plain": ("a", "hydrate_a_ctl.cpu_seconds", "hydrate_a_enc.cpu_seconds"),
    "flush_b_enc_cpu_vs_plain": ("b", "flush_b_ctl.cpu_seconds", "flush_b_enc.cpu_seconds"),
    "hydrate_b_enc_cpu_vs_plain": ("b", "hydrate_b_ctl.cpu_seconds", "hydrate_b_enc.cpu_seconds"),
}
_ENC_SECTIONS = {f"{s}_{w}_{k}" for s in ("flush", "hydrate") for w in "ab" for k in ("ctl", "enc")}


def enc_pairs(run: dict[str, Any], which: str) -> list[dict[str, Any]]:
    pairs = run.get(f"enc_pairs_{which}")
    return pairs if isinstance(pairs, list) and pairs else [run]


def pair_ratios(run: dict[str, Any]) -> dict[str, list[float]]:
    """Every encryption ratio of a run, one per pair (time_control / time_encrypted)."""
    out: dict[str, list[float]] = {}
    for key, (which, num, den) in ENC_RATIOS.items():
        vals = (_div(_get(p, num), _get(p, den)) for p in enc_pairs(run, which))
        out[key] = [v for v in vals if v is not None]
    return out


def ratios(run: dict[str, Any]) -> dict[str, float | None]:
    """Per-run ratios (speed ratios as time_peer / time_driver: > 1 means the driver is faster)."""
    g = lambda k: _get(run, k)  # noqa: E731
    rss = [v for v in (g("flush_a.peak_rss_bytes"), g("flush_b.peak_rss_bytes"), g("flush_c.peak_rss_bytes")) if v]
    return {
        "flush_a_vs_s5cmd_upload": _div(g("s5cmd_upload_a.seconds"), g("flush_a.seconds")),
        "flush_a_vs_rclone_upload": _div(g("rclone_upload_a.seconds"), g("flush_a.seconds")),
        "flush_a_vs_restic_first": _div(g("restic_first_a.seconds"), g("flush_a.seconds")),
        "flush_b_vs_s5cmd_upload": _div(g("s5cmd_upload_b.seconds"), g("flush_b.seconds")),
        "flush_b_vs_rclone_upload": _div(g("rclone_upload_b.seconds"), g("flush_b.seconds")),
        "hydrate_a_vs_s5cmd_download": _div(g("s5cmd_download_a.seconds"), g("hydrate_a.seconds")),
        "hydrate_a_vs_s5cmd_download_fsynced": _div(g("s5cmd_download_synced_a.seconds"), g("hydrate_a.seconds")),
        "hydrate_a_vs_rclone_download": _div(g("rclone_download_a.seconds"), g("hydrate_a.seconds")),
        "hydrate_b_vs_s5cmd_download": _div(g("s5cmd_download_b.seconds"), g("hydrate_b.seconds")),
        "flush_c_uploaded_vs_changed_chunks": _div(g("flush_c.uploaded_bytes"), g("flush_c.changed_chunk_bytes")),
        "flush_c_vs_restic_incremental": _div(g("restic_incremental_c.seconds"), g("flush_c.seconds")),
        "restage_cached_seconds": g("restage_cached.seconds"),
        "node_flush_peak_rss_mb": max(rss) / 1e6 if rss else None,
        # encrypted vs the unencrypted control measured next to it in the same run, in
        # alternating order (time_control / time_encrypted: 1.0 = no cost); also node CPU.
        # Per run: the median of its pairs (build() aggregates the pairs themselves)
        **{k: (statistics.median(v) if v else None) for k, v in pair_ratios(run).items()},
    }


# (ratio key, description, comparison, threshold)
TARGETS: list[tuple[str, str, str, float]] = [
    ("flush_a_vs_s5cmd_upload", "flush (a) vs s5cmd upload", ">=", 1.0),
    ("flush_b_vs_s5cmd_upload", "flush (b) vs s5cmd upload of the raw image", ">=", 3.0),
    ("hydrate_a_vs_s5cmd_download", "hydrate (a) vs s5cmd download", ">=", 0.9),
    ("flush_c_uploaded_vs_changed_chunks", "incremental flush (c): uploaded / changed chunks", "<=", 1.2),
    ("flush_c_vs_restic_incremental", "incremental flush (c) vs restic incremental", ">=", 5.0),
    ("restage_cached_seconds", "cached re-stage (s)", "<", 1.0),
    ("node_flush_peak_rss_mb", "node RSS while flushing (MB)", "<", 200.0),
    ("flush_a_enc_vs_plain", "flush (a) encrypted vs unencrypted", ">=", 0.95),
    ("hydrate_a_enc_vs_plain", "hydrate (a) encrypted vs unencrypted", ">=", 0.95),
    ("flush_b_enc_vs_plain", "flush (b) encrypted vs unencrypted", ">=", 0.95),
    ("hydrate_b_enc_vs_plain", "hydrate (b) encrypted vs unencrypted", ">=", 0.95),
]


def spread(vals: list[float]) -> dict[str, float] | None:
    """Median, min, max and count of vals (None: no value)."""
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def build(meta: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    per_run = [ratios(r) for r in runs]
    figures = {}
    for key, _, _ in FIGURES:
        sec = key.partition(".")[0]
        if sec in _ENC_SECTIONS:            # every pair of every run
            rows = [p for r in runs for p in enc_pairs(r, sec.split("_")[1])]
        else:
            rows = runs
        figures[key] = spread([v for v in (_get(r, key) for r in rows) if v is not None])
    rat = {k: spread([p[k] for p in per_run if p[k] is not None]) for k in per_run[0]} if per_run else {}
    for k in ENC_RATIOS:                    # one ratio per pair: median over runs x pairs
        if k in rat:
            rat[k] = spread([v for r in runs for v in pair_ratios(r)[k]])
    targets = []
    for key, desc, cmp, thr in TARGETS:
        a = rat.get(key)
        met = None
        if a is not None:
            v = a["median"]
            met = v >= thr if cmp == ">=" else v <= thr if cmp == "<=" else v < thr
        targets.append({"key": key, "target": f"{desc} {cmp} {thr:g}", "value": a, "met": met})
    return {"meta": meta, "runs": runs, "run_ratios": per_run, "figures": figures, "ratios": rat,
            "targets": targets}


def _fmt(v: float, unit: str) -> str:
    if unit == "MiB":
        return f"{v / MiB:.1f}"
    if unit == "MB/s":
        return f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.2f}"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    lines = [f"## csi-perssd benchmark {m['date']} on {m['host']} ({m['cpus']} CPUs), "
             f"commit {m.get('commit', '?')}", "",
             f"Volumes of {m['volume_bytes'] / MiB:.0f} MiB, chunks of {m['chunk_bytes'] / MiB:.0f} MiB, "
             f"{m['runs']} runs (median, min-max), one SeaweedFS for all tools; node pools and "
             f"images on XFS (reflink) on a loop device. "
             f"MB/s are of the logical volume size (1 MB = 10^6 bytes). Change (c): "
             f"{m['change']['extents']} x {m['change']['extent_bytes'] / MiB:.0f} MiB extents in "
             f"{m['change']['chunks']} chunks."
             + (f" Load average (1 min) at the start {m['load'][0]:.2f}, at the end {m['load'][1]:.2f}."
                if m.get("load") else "")
             + (f" Encryption rows: {m['enc_pairs']} interleaved unencrypted/encrypted pairs per run for "
                f"each of (a) and (b), the order alternating from pair to pair and run to run; each "
                f"encryption ratio is taken inside its pair, and median/min/max are over all "
                f"{m['enc_pairs'] * m['runs']} pairs (none dropped)." if m.get("enc_pairs", 1) > 1 else "")
             + (" Only the encryption rows were run (--only-enc)." if m.get("only_enc") else "")
             + (" Only (a)'s flush and hydrate and s5cmd's upload and download were run (--only-hydrate)."
                if m.get("only_hydrate") else ""), "",
             "### Targets (ratios inside each run; judged on the median)", "",
             "| target | median | min | max | |", "|---|---:|---:|---:|---|"]
    for t in doc["targets"]:
        a = t["value"]
        if a is None:
            lines.append(f"| {t['target']} | - | - | - | not measured |")
            continue
        mark = "met" if t["met"] else "**missed**"
        lines.append(f"| {t['target']} | {a['median']:.2f} | {a['min']:.2f} | {a['max']:.2f} | {mark} |")
    lines += ["", "### Figures", "", "| figure | unit | median | min | max |", "|---|---|---:|---:|---:|"]
    for key, label, unit in FIGURES:
        a = doc["figures"].get(key)
        if a is None:
            continue
        lines.append(f"| {label} | {unit} | {_fmt(a['median'], unit)} | {_fmt(a['min'], unit)} | {_fmt(a['max'], unit)} |")
    lines += ["", "### Other ratios (peer time / driver time)", "", "| ratio | median | min | max |",
              "|---|---:|---:|---:|"]
    shown = {t["key"] for t in doc["targets"]}
    for k, a in doc["ratios"].items():
        if k not in shown and a is not None:
            lines.append(f"| {k} | {a['median']:.2f} | {a['min']:.2f} | {a['max']:.2f} |")
    v = m.get("versions", {})
    lines += ["", "Tools: " + ", ".join(f"{k} {str(x).splitlines()[0] if x else ''}" for k, x in v.items()), ""]
    return "\n".join(lines)


def git_commit() -> str:
    """The checkout's short commit, or "unknown" outside a git checkout."""
    r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def write_results(out: Path, stem: str, doc: dict[str, Any], md: str) -> None:
    """<out>/<stem>.json and .md (every bench writes its results this way), and the table to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(md)
    print("\n" + md)
