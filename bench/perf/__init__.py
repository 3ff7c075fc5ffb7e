"""``bench perf``: what each method costs per training step, measured side by side.

How it measures (step time, peak memory, parameters, DGST selection, harness overhead) and why: docs/perf.md.
specs.py: the networks; measure.py: measuring; results.py: what was measured; render.py: the tables;
record.py: the MLflow run.
"""
from bench.perf.measure import default_settings, measure_network, resolve_device, run_perf
from bench.perf.record import log_report
from bench.perf.render import TARGETS, render_markdown, render_text, write_report
from bench.perf.results import REFERENCE, NetworkResult, PerfReport
from bench.perf.specs import NetworkSpec, default_hn_plans, network_spec

__all__ = ["REFERENCE", "TARGETS", "NetworkResult", "NetworkSpec", "PerfReport", "default_hn_plans",
           "default_settings", "log_report", "measure_network", "network_spec", "render_markdown", "render_text",
           "resolve_device", "run_perf", "write_report"]
