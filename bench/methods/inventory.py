"""What each registered method trains on a given network: the table behind ``bench methods``."""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

from torch import nn

from bench.methods import METHODS, get_method
from bench.methods.base import MethodContext, count


def method_table(network_factory: Callable[[], nn.Module]) -> List[Dict]:
    """One row per registered method (default hyper-parameters): name, summary, trainable parameters
    after ``prepare`` and their share of the foundation network's parameters. The share is relative
    to the network before ``prepare``: LoRA and adapters add parameters, so it can exceed 100 % on a
    tiny network. ``network_factory`` builds a fresh foundation network per method."""
    rows = []
    for name in METHODS.names():
        network = network_factory()
        total = count(network.parameters())
        method = get_method(name)
        network = method.prepare(network, MethodContext(foundation_state=copy.deepcopy(network.state_dict())))
        trainable = count(p for p in network.parameters() if p.requires_grad)
        rows.append({"method": name, "summary": method.summary, "trainable": trainable,
                     "total": total, "share_percent": 100.0 * trainable / total})
    return rows


def format_table(rows: List[Dict]) -> str:
    cells = [("method", "trainable", "share", "summary")]
    cells += [(r["method"], f"{r['trainable']:,}", f"{r['share_percent']:.2f} %", r["summary"]) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(3)]
    return "\n".join(f"{m:<{w[0]}}  {t:>{w[1]}}  {s:>{w[2]}}  {d}" for m, t, s, d in cells)
