"""The bench's chart: throughput, p50 and p99 against concurrency, for the floor,
every twopc case with two branches (the cases measured at every concurrency) and
pg-plain, the same purchase on PostgreSQL without twopc.

matplotlib is a dev dependency used only here; without it the bench still runs and
says why there is no chart.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

STYLES = {  # (system, phase2): colour, line
    ("floor", "-"): ("black", "-"),
    ("wallet+order", "ack"): ("tab:blue", "-"),
    ("wallet+order", "commit-point"): ("tab:blue", "--"),
    ("durable", "ack"): ("tab:orange", "-"),
    ("durable", "commit-point"): ("tab:orange", "--"),
    ("pg-plain", "-"): ("tab:green", "-"),
    ("wo-postgres", "ack"): ("tab:red", "-"),
    ("wo-postgres", "commit-point"): ("tab:red", "--"),
    ("wo-pg-adapter", "ack"): ("tab:purple", "-"),
    ("wo-pg-adapter", "commit-point"): ("tab:purple", "--"),
}


def draw(result: dict[str, Any], path: Path) -> str:
    """Writes the chart to `path` (PNG). Returns why it could not, or ""."""
    try:
        import matplotlib  # bench-only, optional: imported here

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"not drawn ({e}; pip install matplotlib)"
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        if row["branches"] == 2 and (row["system"], row["phase2"]) in STYLES:
            series.setdefault((row["system"], row["phase2"]), []).append(row)
    if not series:
        return "not drawn (no two-branch rows)"
    fig, (tps, lat) = plt.subplots(1, 2, figsize=(11, 5.4), layout="constrained")
    for key, rows in series.items():
        rows.sort(key=lambda r: r["concurrency"])
        colour, line = STYLES[key]
        label = key[0] if key[1] == "-" else f"{key[0]} ({key[1]})"
        cs = [r["concurrency"] for r in rows]
        tps.plot(cs, [r["tps"] for r in rows], line, color=colour, marker="o", label=label)
        lat.plot(cs, [r["p50_ms"] for r in rows], line, color=colour, marker="o", label=f"{label} p50")
        lat.plot(cs, [r["p99_ms"] for r in rows], line, color=colour, marker="^", alpha=0.45, label=f"{label} p99")
    machine = result.get("machine", {})
    ticks = sorted({r["concurrency"] for rows in series.values() for r in rows})
    for ax, title, unit in ((tps, "throughput", "committed txn/s"), (lat, "latency (p50 o, p99 ^)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.minorticks_off()
        ax.set_xlabel("transactions in flight")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    lat.set_yscale("log")
    tps.legend(fontsize=8)
    lat.legend(fontsize=7, ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    load = [machine.get(k, [math.nan])[0] for k in ("loadavg_at_start", "loadavg_at_end")]
    fig.suptitle(
        f"twopc against the floor, two branches ({machine.get('cpu_count', '?')} cores, load average "
        f"{load[0]:.1f} at start, {load[1]:.1f} at end; git {machine.get('git', '?')})",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""
