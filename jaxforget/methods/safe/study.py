"""SAFE's benchmark study: accuracy and deletion cost as the number of shards grows, for every graph kind.

For each seed one backbone is trained (core data only) and shared by every configuration of that seed. For each
graph and shard count the whole system is built, its test accuracy measured, its expected deletion cost computed
under both conventions (:mod:`.graph`), and ``requests`` single-sample deletions timed after a warm-up request,
next to the time of retraining every adapter (the gold standard, :meth:`Safe.retrain`) and of retraining the
unsharded model. Also the parallel speed-up of training a graph's nodes in one ``vmap`` chunk against a Python loop
over nodes (width 1), for the widest configuration of the sweep. Inference: the median latency of ``predict`` on the
test set (one backbone pass plus every adapter) and the adapters' bytes, per configuration; and, once per seed, the
feature cache against on-the-fly features: one backbone pass over the training set next to training every adapter
from the cached features (the unsharded retrain). Results: JSON rows, PNGs (accuracy vs shards, accuracy vs expected
cost, inference latency and memory vs shards) and a markdown table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from jaxforget import data as data_lib
from jaxforget import evaluate, models, timing
from jaxforget import mesh as mesh_lib
from jaxforget.methods.safe import backbone as backbone_lib
from jaxforget.methods.safe import method as method_lib

PREDICT_REPEATS = 5  # timed predict calls per configuration (median, after a warm-up call)


def _graph_config(label: str, shards: int) -> dict | None:
    """``label`` (isolated, cliques<c>, ring<d>, safe_shard) at ``shards`` shards, or None where it does not exist."""
    if label == "isolated" or label == "safe_shard":
        return dict(kind=label, shards=shards, clique=1, degree=0)
    if label.startswith("cliques"):
        c = int(label[len("cliques"):])
        return dict(kind="cliques", shards=shards, clique=c, degree=0) if c <= shards and shards % c == 0 else None
    if label.startswith("ring"):
        d = int(label[len("ring"):])
        return dict(kind="ring", shards=shards, clique=1, degree=d) if 2 * d + 1 <= shards else None
    raise KeyError(f"Unknown graph label {label!r} (isolated, cliques<c>, ring<d>, safe_shard).")


def _one(job, graph_cfg, seed, backbone, splits, mesh, requests) -> dict:
    cfg = job.method.copy_and_resolve_references()
    cfg.graph.update(graph_cfg)
    cls = method_lib.Sisa if graph_cfg["kind"] == "isolated" else method_lib.Safe
    cfg.name = cls.name
    method = cls(models.get_model(job.model), splits, cfg, mesh=mesh)
    state = method.init(jax.random.key(seed), backbone=backbone, backbone_ids=splits.core_ids)
    _, retrain_seconds = timing.timed(lambda: method.retrain(state).adapters)  # compiled by init
    order = np.random.default_rng(seed).permutation(method.forgettable_ids())
    state, _ = method.forget(state, order[:1])  # warm-up (the predict/forget programs)
    seconds, cost_sum, cost_union, nodes = [], [], [], []
    for i in range(1, requests + 1):
        state, info = method.forget(state, order[i : i + 1])
        seconds.append(info.seconds)
        cost_sum.append(info.notes["cost_sum"])
        cost_union.append(info.notes["cost_union"])
        nodes.append(len(info.notes["affected_nodes"]))
    d = method.describe(state)
    accuracy = evaluate.accuracy(method.predict(state, splits.test.x), splits.test.y)
    predict_seconds = timing.median_time(lambda: method.predict(state, splits.test.x), PREDICT_REPEATS)
    adapter_bytes = int(sum(leaf.nbytes for leaf in jax.tree.leaves(state.adapters)))
    return {"accuracy": accuracy, "expected_cost_sum": d["expected_cost_sum"],
            "expected_cost_union": d["expected_cost_union"], "nodes": d["nodes"], "width": d["width"],
            "retrain_seconds": retrain_seconds, "forget_seconds": float(np.median(seconds)),
            "counted_cost_sum": float(np.mean(cost_sum)), "counted_cost_union": float(np.mean(cost_union)),
            "affected_nodes": float(np.mean(nodes)), "predict_ms": 1e3 * predict_seconds,
            "adapter_bytes": adapter_bytes, "adapter_bytes_per_node": adapter_bytes // d["nodes"]}


def _feature_pass(model, backbone, splits, layer: str) -> dict:
    """Seconds of one backbone pass over the training set (what the feature cache saves on every build and
    retrain) and milliseconds of one over the test set (the fixed part of every ``predict``), medians."""
    train_x, test_x = np.asarray(splits.train.x), np.asarray(splits.test.x)
    return {"backbone_pass_seconds": timing.median_time(
                lambda: backbone_lib.features(model, backbone, train_x, layer), PREDICT_REPEATS),
            "test_backbone_ms": 1e3 * timing.median_time(
                lambda: backbone_lib.features(model, backbone, test_x, layer), PREDICT_REPEATS)}


def _parallel(job, graph_cfg, seed, backbone, splits, mesh) -> dict:
    """Build time of every node at the graph's natural width (one vmap chunk) vs width 1 (a loop over nodes)."""
    out = {}
    for label, width in (("vmap", graph_cfg["shards"]), ("loop", 1)):
        cfg = job.method.copy_and_resolve_references()
        cfg.graph.update(graph_cfg)
        cfg.name, cfg.width = "sisa", width
        method = method_lib.Sisa(models.get_model(job.model), splits, cfg, mesh=mesh)
        # Compiles this width.
        state = method.init(jax.random.key(seed), backbone=backbone, backbone_ids=splits.core_ids)
        _, out[f"{label}_seconds"] = timing.timed(lambda m=method, s=state: m.retrain(s).adapters)
    out["speedup"] = out["loop_seconds"] / out["vmap_seconds"]
    out["nodes"] = graph_cfg["shards"]
    return out


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def shard_sweep(job: ml_collections.ConfigDict, *, graphs: Sequence[str], shards: Sequence[int],
                seeds: Sequence[int], requests: int = 3, plots_dir: str | None = None) -> dict:
    """The sweep (see the module docstring). ``job`` is a SAFE forget-job config (data, model, method)."""
    splits = data_lib.get_splits(job.data)
    mesh = mesh_lib.make_mesh(job.num_devices or None)
    model = models.get_model(job.model)
    raw: dict[tuple[str, int], list[dict]] = {}
    parallel, passes = None, []
    for seed in seeds:
        base_cfg = job.method.copy_and_resolve_references()
        base_cfg.graph.update(dict(kind="isolated", shards=1))
        base_cfg.name = "sisa"
        backbone = method_lib.Sisa(model, splits, base_cfg, mesh=mesh).train_backbone(jax.random.key(seed))
        passes.append(_feature_pass(model, backbone, splits, base_cfg.layer))
        raw.setdefault(("no_sharding", 1), []).append(
            _one(job, dict(kind="isolated", shards=1, clique=1, degree=0), seed, backbone, splits, mesh, requests))
        for label in graphs:
            for n in shards:
                graph_cfg = _graph_config(label, n)
                if graph_cfg is None or n == 1:
                    continue
                print(f"   {label} n={n} seed={seed}", flush=True)
                raw.setdefault((label, n), []).append(_one(job, graph_cfg, seed, backbone, splits, mesh, requests))
        if parallel is None:
            parallel = _parallel(job, dict(kind="isolated", shards=max(shards), clique=1, degree=0), seed, backbone,
                                 splits, mesh)
    base = raw[("no_sharding", 1)]
    rows = []
    for (label, n), runs in raw.items():
        row = {"graph": label, "shards": n}
        for field in runs[0]:
            row[field] = _summary([r[field] for r in runs])
        row["accuracy_gap_points"] = _summary([100 * (b["accuracy"] - r["accuracy"]) for b, r in zip(base, runs,
                                                                                                    strict=True)])
        row["forget_over_retrain"] = _summary([r["forget_seconds"] / r["retrain_seconds"] for r in runs])
        row["forget_over_no_sharding_retrain"] = _summary([r["forget_seconds"] / b["retrain_seconds"]
                                                            for b, r in zip(base, runs, strict=True)])
        row["latency_vs_no_sharding"] = _summary([r["predict_ms"] / b["predict_ms"]
                                                   for b, r in zip(base, runs, strict=True)])
        rows.append(row)
    cache = {field: _summary([p[field] for p in passes]) for field in passes[0]}
    cache["retrain_seconds"] = _summary([b["retrain_seconds"] for b in base])
    cache["backbone_pass_over_retrain"] = _summary([p["backbone_pass_seconds"] / b["retrain_seconds"]
                                                    for b, p in zip(base, passes, strict=True)])
    cache["samples"] = int(len(splits.train.y))
    out = {"rows": rows, "parallel": parallel, "feature_cache": cache, "seeds": list(seeds), "requests": requests,
           "predict_repeats": PREDICT_REPEATS, "target": _target(rows)}
    if plots_dir:
        out["plots"] = plot_sweep(rows, plots_dir) + plot_inference(rows, cache, plots_dir)
    out["markdown"] = sweep_markdown(out)
    return out


def _target(rows: list[dict]) -> dict:
    """The issue's target: expected cost (sum) ≤ 1/16 with test accuracy ≤ 2 points below no sharding."""
    cheap = [r for r in rows if r["expected_cost_sum"]["mean"] <= 1 / 16 + 1e-12]
    best = max(cheap, key=lambda r: r["accuracy"]["mean"], default=None)
    if best is None:
        return {"met": False, "best": None}
    return {"met": bool(best["accuracy_gap_points"]["mean"] <= 2.0), "best": f"{best['graph']} n={best['shards']}",
            "gap_points": best["accuracy_gap_points"]["mean"], "expected_cost_sum": best["expected_cost_sum"]["mean"]}


def sweep_markdown(out: dict) -> str:
    lines = [f"Shard sweep (mean ± std over seeds {out['seeds']}; {out['requests']} single-sample deletions per "
             "configuration after a warm-up; costs are E[C]/N; predict: median of "
             f"{out.get('predict_repeats', '?')} calls on the test set after a warm-up):", "",
             "| graph | shards | test acc. | points below no sharding | E[C] sum | E[C] union | nodes retrained | "
             "forget s | forget / retrain all | forget / retrain unsharded | predict ms | predict / unsharded | "
             "adapters KiB (per node) |", "|" + "---|" * 13]
    for r in sorted(out["rows"], key=lambda r: (r["graph"] != "no_sharding", r["graph"], r["shards"])):
        lines.append(
            f"| {r['graph']} | {r['shards']} | {r['accuracy']['mean']:.4f} ± {r['accuracy']['std']:.4f} "
            f"| {r['accuracy_gap_points']['mean']:+.1f} | {r['expected_cost_sum']['mean']:.3f} "
            f"| {r['expected_cost_union']['mean']:.3f} | {r['affected_nodes']['mean']:.1f} "
            f"| {r['forget_seconds']['mean']:.3f} | {r['forget_over_retrain']['mean']:.2f} "
            f"| {r['forget_over_no_sharding_retrain']['mean']:.2f} "
            f"| {r['predict_ms']['mean']:.1f} ± {r['predict_ms']['std']:.1f} "
            f"| {r['latency_vs_no_sharding']['mean']:.2f} "
            f"| {r['adapter_bytes']['mean'] / 1024:.1f} ({r['adapter_bytes_per_node']['mean'] / 1024:.1f}) |")
    t = out["target"]
    lines += ["", "Target (E[C] sum ≤ 1/16 within 2 points of no sharding): "
              + (f"{'✓' if t['met'] else '✗'} best {t['best']}: {t['gap_points']:+.1f} points at E[C] = "
                 f"{t['expected_cost_sum']:.3f}" if t.get("best") else "✗ no configuration reaches E[C] ≤ 1/16")]
    p = out.get("parallel")
    if p:
        lines += ["", f"Parallel training of {p['nodes']} nodes: one vmap chunk {p['vmap_seconds']:.2f} s, a loop "
                      f"over nodes {p['loop_seconds']:.2f} s ({p['speedup']:.2f}×)."]
    c = out.get("feature_cache")
    if c:
        lines += ["", f"Feature cache vs on the fly: one backbone pass over the {c['samples']} training samples takes "
                      f"{c['backbone_pass_seconds']['mean']:.3g} ± {c['backbone_pass_seconds']['std']:.2g} s, "
                      f"{c['backbone_pass_over_retrain']['mean']:.3g}× the training of the unsharded adapter from "
                      f"cached features ({c['retrain_seconds']['mean']:.3g} s); the cache computes it once per "
                      "backbone, on-the-fly features repeat it in every epoch of every adapter. Of each "
                      f"predict, the backbone pass over the test set takes {c['test_backbone_ms']['mean']:.1f} ms."]
    return "\n".join(lines)


def _figure(rows: list[dict], plots_dir: str, ncols: int, width: float):
    """``(plt, fig, axes, no_sharding row, {graph: its rows by shards})`` for one row of ``ncols`` panels."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    os.makedirs(plots_dir, exist_ok=True)
    base = next(r for r in rows if r["graph"] == "no_sharding")
    series = {label: sorted((r for r in rows if r["graph"] == label), key=lambda r: r["shards"])
              for label in sorted({r["graph"] for r in rows} - {"no_sharding"})}
    fig, axes = plt.subplots(1, ncols, figsize=(width, 4.2))
    return plt, fig, axes, base, series


def _save(plt, fig, plots_dir: str, name: str) -> list[str]:
    fig.tight_layout()
    path = os.path.join(plots_dir, name)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_sweep(rows: list[dict], plots_dir: str) -> list[str]:
    """Accuracy vs shards and accuracy vs expected cost (both conventions), one line per graph."""
    plt, fig, axes, base, series = _figure(rows, plots_dir, 3, 15)
    for label, rs in series.items():
        acc = [r["accuracy"]["mean"] for r in rs]
        err = [r["accuracy"]["std"] for r in rs]
        axes[0].errorbar([r["shards"] for r in rs], acc, yerr=err, marker="o", label=label, capsize=2)
        for ax, field in ((axes[1], "expected_cost_sum"), (axes[2], "expected_cost_union")):
            ax.plot([r[field]["mean"] for r in rs], acc, marker="o", label=label)
    for ax in axes:
        ax.axhline(base["accuracy"]["mean"], color="k", ls="--", lw=1, label="no sharding")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("shards n")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("expected deletion cost E[C_sum]/N")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("expected deletion cost E[C_union]/N")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, plots_dir, "safe_shard_sweep.png")


def plot_inference(rows: list[dict], cache: dict, plots_dir: str) -> list[str]:
    """Predict latency and the adapters' memory vs shards, one line per graph (``inference_vs_shards.png``)."""
    plt, fig, axes, base, series = _figure(rows, plots_dir, 2, 10)
    for label, rs in series.items():
        n = [r["shards"] for r in rs]
        axes[0].errorbar(n, [r["predict_ms"]["mean"] for r in rs], yerr=[r["predict_ms"]["std"] for r in rs],
                         marker="o", label=label, capsize=2)
        axes[1].plot(n, [r["adapter_bytes"]["mean"] / 1024 for r in rs], marker="o", label=label)
    axes[0].axhline(base["predict_ms"]["mean"], color="k", ls="--", lw=1, label="no sharding")
    axes[0].axhline(cache["test_backbone_ms"]["mean"], color="gray", ls=":", lw=1, label="backbone pass only")
    axes[1].axhline(base["adapter_bytes"]["mean"] / 1024, color="k", ls="--", lw=1, label="no sharding")
    axes[0].set_ylabel("predict on the test set (ms, median)")
    axes[1].set_ylabel("adapters (KiB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shards n")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, plots_dir, "inference_vs_shards.png")
