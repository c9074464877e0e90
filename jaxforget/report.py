"""Reports: the JSON record of a run, its PNG plots, and the Markdown table the README shows.

Every figure in a report is measured by the run that wrote it; the README's results table is generated
from ``report.json`` by :func:`markdown_table` (``python -m jaxforget.report runs/demo/report.json``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np
from matplotlib.figure import Figure  # no pyplot: never switches the caller's (e.g. a notebook's) backend

SCHEMA_VERSION = 1


def build(config, meta: dict, *, splits: dict, env: dict) -> dict:
    """Assembles the report: resolved config, seeds, versions, per-request records and a summary."""
    requests = meta.get("requests", [])
    summary = {}
    if requests:
        def median(path):
            vals = []
            for r in requests:
                v = r
                for p in path:
                    v = v.get(p) if isinstance(v, dict) else None
                if isinstance(v, (int, float)) and v is not None:
                    vals.append(float(v))
            return float(np.median(vals)) if vals else None

        summary = {
            "num_requests": len(requests),
            "median_forget_seconds": median(("forget", "seconds")),
            "median_cg_iterations": median(("forget", "iterations")),
            "max_solver_residual_rel": max(r["solver_residual_rel"] for r in requests),
            "max_influence_left": max(r["influence_left"] for r in requests),
            "median_speedup_vs_retrain": {
                name: median(("speedup_vs_retrain", name)) for name in requests[-1]["speedup_vs_retrain"]
            },
            "final": requests[-1]["readouts"],
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "method": config.get("method_name", "mixed_linear"),
        "config": json.loads(config.to_json_best_effort()),
        "seeds": {"run": int(config.seed), "data": int(config.data.seed), "requests": int(config.requests.seed)},
        "environment": env,
        "splits": splits,
        "train_seconds": meta.get("train_seconds"),
        "initial": meta.get("initial"),
        "requests": requests,
        "summary": summary,
        "recompilations_between_requests": meta.get("recompilations_between_requests"),
        "preconditioner_build_seconds": meta.get("preconditioner_build_seconds"),
        "peak_host_rss_mib": meta.get("peak_host_rss_mib"),
        "sigma_sweep": meta.get("sigma_sweep"),
        "forget_all": meta.get("forget_all"),
        "resumed_at": meta.get("resumed_at", []),
    }


def _clean(obj):
    """JSON-safe copy: NaN/Inf become None, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(obj: dict, path: str) -> None:
    """Writes ``obj`` as JSON atomically: to a temporary file in the same directory, then renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=2, sort_keys=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_requests(rep: dict, path: str) -> None:
    """Accuracy on forget/retain/test (method vs retrain oracle) and residual to the oracle, per request."""
    reqs = rep["requests"]
    if not reqs:
        return
    k = [r["request"] for r in reqs]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, color in (("forget", "C3"), ("retain", "C0"), ("test", "C2")):
        ax1.plot(k, [r["readouts"][name]["accuracy"] for r in reqs], "o-", color=color, label=f"{name} (method)")
        ax1.plot(k, [r["readouts"][name]["oracle_accuracy"] for r in reqs], "x--", color=color,
                 label=f"{name} (retrain)")
    ax1.set(xlabel="request", ylabel="accuracy", title="Accuracy: method vs retrain from scratch")
    ax1.legend(fontsize=7, ncol=2)
    ax2.semilogy(k, [r["solver_residual_rel"] for r in reqs], "o-", label="‖w − w*‖/‖w*‖ (pre-noise)")
    ax2.semilogy(k, [r["influence_left"] for r in reqs], "s-", label="influence left")
    for name, color in (("cg_retrain", "C4"), ("sgd_retrain", "C5")):
        vals = [r["retrain"].get(name, {}).get("rel_error") for r in reqs]
        if any(v is not None for v in vals):
            ax2.semilogy(k, vals, "^--", color=color, label=f"{name} rel. error")
    ax2.set(xlabel="request", ylabel="relative distance", title="Distance to the exact (float64) retrain")
    ax2.legend(fontsize=7)
    _save(fig, path)


def plot_sigma_sweep(rep: dict, path: str) -> None:
    """Test error and distance to the oracle (left), KL proxy (right) against the noise std σ."""
    rows = rep["sigma_sweep"]
    s = [r["sigma"] for r in rows]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.semilogx(s, [r["test_error"] for r in rows], "o-", color="C3", label="test error")
    ax1.set(xlabel="noise std σ", ylabel="test error", title="Test error and residual vs σ")
    ax1b = ax1.twinx()
    ax1b.loglog(s, [r["rel_distance_to_oracle"] for r in rows], "s--", color="C0", label="‖w − w*‖/‖w*‖")
    ax1b.set_ylabel("relative distance to retrain")
    ax1.legend(loc="upper left", fontsize=7)
    ax1b.legend(loc="lower right", fontsize=7)
    kl = [r["kl_proxy_nats"] for r in rows]
    ax2.loglog(s, [max(v, 1e-300) for v in kl], "o-")
    ax2.set(xlabel="noise std σ", ylabel="KL proxy (nats)", title="Remaining-information proxy vs σ")
    _save(fig, path)


def markdown_table(rep: dict) -> str:
    """The README results table for one report: final readouts with the retrain values beside them."""
    s = rep["summary"]
    fin = s["final"]
    lines = [
        f"Requests: {s['num_requests']} × {rep['requests'][0]['forget']['num_forgotten']}"
        f" ids; device: {rep['environment']['device_kind']}; jax {rep['environment']['jax']}.",
        "",
        "| readout (after the last request) | mixed-linear forget | retrain from scratch |",
        "|---|---|---|",
    ]
    for name in ("forget", "retain", "test"):
        lines.append(f"| accuracy on {name} | {fin[name]['accuracy']:.4f} | {fin[name]['oracle_accuracy']:.4f} |")
    for name in ("forget", "retain", "test"):
        lines.append(f"| activation distance on {name} | {fin[name]['activation_distance']:.2e} | 0 |")
    lines += [
        f"| max ‖w − w*‖/‖w*‖ over requests (pre-noise) | {s['max_solver_residual_rel']:.2e} | 0 |",
        f"| max share of a request's influence left | {s['max_influence_left']:.2e} | 0 |",
        f"| median CG iterations per request | {s['median_cg_iterations']:.0f} | |",
        f"| median forget time (s) | {s['median_forget_seconds']:.3f} | |",
    ]
    for name, v in s["median_speedup_vs_retrain"].items():
        err = rep["requests"][-1]["retrain"][name]["rel_error"]
        err = "diverged (NaN)" if err is None else f"{err:.2e}"
        lines.append(f"| median speed-up vs {name} (rel. error of that retrain: {err}) | {v:.2f}× | 1× |")
    lines.append(f"| recompilations between requests | {rep['recompilations_between_requests']} | |")
    return "\n".join(lines)


def update_readme(readme_path: str, table: str, source: str, *, block: str = "results", command: str = "") -> None:
    """Replaces the README block between ``<!-- {block}:start -->`` and ``<!-- {block}:end -->`` (atomically)."""
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    with open(readme_path, encoding="utf-8") as f:
        text = f.read()
    head, sep, rest = text.partition(start)
    _, sep2, tail = rest.partition(end)
    if not sep or not sep2:
        raise ValueError(f"{readme_path} has no {start} ... {end} block.")
    note = f"<!-- generated from {source} by `{command or 'python -m jaxforget.report ' + source + ' --readme'}` -->"
    tmp = readme_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{note}\n{table}\n{end}{tail}")
    os.replace(tmp, readme_path)


if __name__ == "__main__":
    # python -m jaxforget.report runs/demo/report.json [--readme [README.md]]
    with open(sys.argv[1]) as f:
        table = markdown_table(json.load(f))
    if "--readme" in sys.argv[2:]:
        rest = sys.argv[sys.argv.index("--readme") + 1 :]
        update_readme(rest[0] if rest else "README.md", table, sys.argv[1])
    else:
        print(table)
