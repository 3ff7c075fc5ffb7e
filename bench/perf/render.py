"""The ``bench perf`` tables: console text, ``perf_<device>.md`` and ``.csv`` (generated, never edited)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bench.perf.results import REFERENCE, NetworkResult, PerfReport

# Printed next to the measured ratios; never asserted (timings depend on the machine).
TARGETS = {
    "dgst_step_ratio": ("<=", 1.05, "DGST step time / full fine-tuning"),
    "dgst_memory_ratio": ("<=", 1.05, "DGST peak memory / full fine-tuning"),
    "harness_ratio": ("<=", 1.03, "harness step / stock nnU-Net train_step"),
    "selection_speedup": (">=", 50.0, "released selection time / DGST selection time (default architecture)"),
}


def _fmt(v, spec: str = ".3f", none: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return none
    return format(v, spec)


def _verdict(key: str, value: Optional[float]) -> str:
    op, bound, _ = TARGETS[key]
    if value is None:
        return f"target {op} {bound:g}: n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return f"target {op} {bound:g}{'x' if key != 'harness_ratio' else ''}: {'met' if ok else 'NOT met'}"


def method_table(net: NetworkResult) -> List[List[str]]:
    head = ["method", "trainable", "changed", "step s (median)", "IQR s", "step x full", "peak MiB", "memory x full",
            "note"]
    lines = [head]
    for r in net.rows:
        if r.get("error") and "median_s" not in r:
            lines.append([r["method"]] + [""] * 7 + [r["error"]])
            continue
        note = r.get("error") or ""
        if r["method"] == "dgst":
            note = "; ".join(x for x in (note, "step " + _verdict("dgst_step_ratio", r["step_ratio"]),
                                         "memory " + _verdict("dgst_memory_ratio", r["memory_ratio"])) if x)
        lines.append([r["method"], f"{r['trainable']:,}", f"{r['changed']:,}", _fmt(r["median_s"], ".3f"),
                      f"{_fmt(r['q25_s'])}-{_fmt(r['q75_s'])}", _fmt(r["step_ratio"], ".3f"),
                      _fmt(r["peak_mib"], ".0f"), _fmt(r["memory_ratio"], ".3f"), note])
    return lines


def _md_table(lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join("---" for _ in lines[0]) + "|"]
    out += ["| " + " | ".join(l) + " |" for l in lines[1:]]
    return "\n".join(out)


def _text_table(lines: List[List[str]]) -> str:
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 or i == len(l) - 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(l, widths))).rstrip() for l in lines)


def _selection_lines(net: NetworkResult) -> List[str]:
    s = net.selection
    key = "selection_speedup"
    target = _verdict(key, s["speedup"]) + ("" if net.key == "default" else " (target set for the default architecture)")
    return [f"DGST selection (topk_indices) vs released selection (eye(row_length) + two argsorts), same gradients: "
            f"{s['tensors']} sparse tensors, {s['entries']:,} entries, gamma {s['gamma']}, longest row "
            f"{s['max_row_length']:,}",
            f"  ours {_fmt(s['ours']['median_s'], '.4f')} s (IQR {_fmt(s['ours']['q25_s'], '.4f')}-"
            f"{_fmt(s['ours']['q75_s'], '.4f')}), {_fmt(100 * (s['share_of_full_step'] or float('nan')), '.1f')}% "
            f"of a full fine-tuning step; released {_fmt(s['released']['median_s'], '.4f')} s (IQR "
            f"{_fmt(s['released']['q25_s'], '.4f')}-{_fmt(s['released']['q75_s'], '.4f')}); "
            f"speed-up {_fmt(s['speedup'], '.1f')}x ({target})",
            f"  masks agree on {s['agreement']:.6f} of entries; {s['rows_equal']:,}/{s['rows']:,} rows identical, "
            f"{s['rows_differing_by_ties']} differ only by tied |gradient|, {s['rows_differing_otherwise']} otherwise"]


def _harness_line(net: NetworkResult) -> str:
    h = net.harness
    return (f"Harness overhead: BenchTrainer.train_step (training_step + full) {_fmt(h['harness']['median_s'])} s "
            f"(IQR {_fmt(h['harness']['q25_s'])}-{_fmt(h['harness']['q75_s'])}) vs stock nnUNetTrainer.train_step "
            f"{_fmt(h['stock']['median_s'])} s (IQR {_fmt(h['stock']['q25_s'])}-{_fmt(h['stock']['q75_s'])}) on the "
            f"same network, optimizer, loss and batch: ratio {_fmt(h['ratio'])} ({_verdict('harness_ratio', h['ratio'])})")


def _header(report: PerfReport) -> List[str]:
    v = report.versions
    amp = "AMP (autocast + GradScaler)" if report.device == "cuda" else "fp32 (no AMP on CPU, as nnU-Net)"
    return [f"device: {report.device_name}",
            f"date: {report.date}; torch {v.get('torch', '?')}, nnunetv2 {v.get('nnunetv2', '?')}, "
            f"bench {v.get('bench', '?')}, python {v.get('python', '?')}",
            f"steps: {report.steps} timed rounds (round-robin over all methods, rotating start), {report.warmup} "
            f"warm-up steps per method, selection repetitions {report.selection_reps}, seed {report.seed}; "
            f"'x full' and harness/stock are medians of within-round ratios",
            f"step: bench.engine.step.training_step, nnU-Net SGD (momentum 0.99, nesterov, weight decay 3e-5), "
            f"nnU-Net loss (nnUNetTrainer._build_loss: Dice + CE, deep supervision), random data and labels, {amp}",
            f"peak memory: per method, from before its network is built to the end of its warm-up steps, median "
            f"of {report.memory_reps} such window(s) in rotating order; {report.memory_method}",
            "changed: entries of the exported weights that differ after warm-up + timed steps "
            "(random 'foundation' weights)"]


def render_text(report: PerfReport) -> str:
    out = [f"bench perf on {report.device_name}"] + ["  " + h for h in _header(report)[1:]]
    for net in report.networks:
        out += ["", f"[{net.key}] {net.title}: patch {'x'.join(map(str, net.patch))}, batch {net.batch}, "
                    f"{net.total_params:,} parameters", _text_table(method_table(net)), ""]
        out += _selection_lines(net) + [_harness_line(net)]
    return "\n".join(out)


def render_markdown(report: PerfReport) -> str:
    out = [f"# Training-step cost per method ({report.device_slug})", "",
           "<!-- generated by `bench perf`; never edit by hand: rerun the command -->", ""]
    out += [f"- {h}" for h in _header(report)]
    for net in report.networks:
        out += ["", f"## {net.key}: {net.title}", "",
                f"patch {'x'.join(map(str, net.patch))}, batch {net.batch}, features {net.features}, "
                f"{net.total_params:,} parameters", "", _md_table(method_table(net)), ""]
        sel = _selection_lines(net)
        out += [sel[0], "", "- " + sel[1].strip(), "- " + sel[2].strip(), "", _harness_line(net)]
    return "\n".join(out) + "\n"


CSV_FIELDS = ["section", "network", "patch", "batch", "name", "median_s", "q25_s", "q75_s", "n", "ratio",
              "ratio_to", "target", "peak_mib", "memory_ratio", "trainable", "changed", "total", "agreement", "error"]


def csv_rows(report: PerfReport) -> List[Dict[str, Any]]:
    out = []
    for net in report.networks:
        common = {"network": net.key, "patch": "x".join(map(str, net.patch)), "batch": net.batch}
        for r in net.rows:
            target = ""
            if r["method"] == "dgst":
                target = f"step<={TARGETS['dgst_step_ratio'][1]};memory<={TARGETS['dgst_memory_ratio'][1]}"
            out.append({"section": "method", **common, "name": r["method"],
                        **{k: r.get(k) for k in ("median_s", "q25_s", "q75_s", "n", "peak_mib", "memory_ratio",
                                                 "trainable", "changed", "total", "error")},
                        "ratio": r.get("step_ratio"), "ratio_to": REFERENCE, "target": target})
        s = net.selection
        out.append({"section": "selection", **common, "name": "dgst-topk", **s["ours"],
                    "ratio": s["share_of_full_step"], "ratio_to": "full step", "agreement": s["agreement"]})
        out.append({"section": "selection", **common, "name": "released", **s["released"], "ratio": s["speedup"],
                    "ratio_to": "dgst-topk (speed-up)", "target": f">={TARGETS['selection_speedup'][1]:g} (default)",
                    "agreement": s["agreement"]})
        h = net.harness
        out.append({"section": "harness", **common, "name": "nnunet-stock", **h["stock"]})
        out.append({"section": "harness", **common, "name": "harness", **h["harness"], "ratio": h["ratio"],
                    "ratio_to": "nnunet-stock", "target": f"<={TARGETS['harness_ratio'][1]}"})
    for row in out:
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = f"{v:.6g}"
    return out


def write_report(report: PerfReport, out_dir, suffix: str = "") -> Tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"perf_{report.device_slug}{suffix}"
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md)
    tmp = cs.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows(report))
    tmp.replace(cs)
    return md, cs
