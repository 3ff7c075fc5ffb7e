"""A ``bench perf`` report as one MLflow run (through ``bench.tracking``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Sequence

from bench.perf.results import PerfReport


def _metric_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


def log_report(report: PerfReport, files: Sequence[Path], tracking_uri: Optional[str] = None) -> str:
    """One MLflow run tagged kind=perf: settings as params, every number as a metric, the table as artefacts."""
    from bench import tracking

    tags = {"kind": "perf", "device": report.device_name, "device_slug": report.device_slug}
    with tracking.start_run(f"perf-{report.device_slug}", tags, tracking_uri) as run_id:
        params = {"device": report.device, "device_name": report.device_name[:500], "steps": report.steps,
                  "warmup": report.warmup, "selection_reps": report.selection_reps, "seed": report.seed,
                  "memory_reps": report.memory_reps,
                  "threads": report.threads, "memory_method": report.memory_method[:500],
                  **{f"versions.{k}": v for k, v in report.versions.items()}}
        for net in report.networks:
            params[f"{net.key}.patch"] = "x".join(map(str, net.patch))
            params[f"{net.key}.batch"] = net.batch
            params[f"{net.key}.features"] = ",".join(map(str, net.features))
            params[f"{net.key}.methods"] = ",".join(r["method"] for r in net.rows)[:500]
        tracking.log_params({k: str(v) for k, v in params.items()})
        metrics: Dict[str, float] = {}
        for net in report.networks:
            for r in net.rows:
                for k in ("median_s", "q25_s", "q75_s", "step_ratio", "peak_mib", "memory_ratio", "trainable",
                          "changed"):
                    v = r.get(k)
                    if isinstance(v, (int, float)) and v == v:
                        metrics[_metric_key(net.key, r["method"], k)] = float(v)
            s, h = net.selection, net.harness
            for k, v in (("selection/ours_median_s", s["ours"]["median_s"]),
                         ("selection/released_median_s", s["released"]["median_s"]),
                         ("selection/speedup", s["speedup"]), ("selection/agreement", s["agreement"]),
                         ("selection/share_of_full_step", s["share_of_full_step"]),
                         ("harness/stock_median_s", h["stock"]["median_s"]),
                         ("harness/harness_median_s", h["harness"]["median_s"]), ("harness/ratio", h["ratio"])):
                if isinstance(v, (int, float)) and v == v:
                    metrics[f"{net.key}/{k}"] = float(v)
        tracking.log_metrics(metrics)
        for f in files:
            tracking.log_artifact(str(f))
        return run_id
