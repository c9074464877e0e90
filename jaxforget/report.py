"""Reports: the JSON record of a run, its PNG plots, and the Markdown table the README shows.

Every figure in a report is measured by the run that wrote it; the README's results table is generated
from ``report.json`` by :func:`markdown_table` (``python -m jaxforget.report runs/demo/report.json``).
Compare reports (``"kind": "compare"``: every method on several seeds, spec evaluation.md §10) are built from
:func:`metric_record` / :func:`timing_record`, checked by :func:`validate_compare_report` and rendered by
:func:`compare_markdown` and the ``plot_*`` functions below; the same command puts their table in the README block
``compare``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np

from jaxforget import distributional

SCHEMA_VERSION = 2


def build(config, meta: dict, *, splits: dict, env: dict) -> dict:
    """Assembles a forget-job report: resolved config, seeds, versions, per-request records and a summary."""
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
            "median_iterations": median(("forget", "iterations")),
            "median_passes": median(("forget", "passes")),
            "max_rel_weight_distance": max(r["rel_weight_distance"] for r in requests),
            "max_influence_left": max(r["influence_left"] for r in requests),
            "median_speedup_vs_retrain": {
                name: median(("speedup_vs_retrain", name)) for name in requests[-1]["speedup_vs_retrain"]
            },
            "final": requests[-1]["readouts"],
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "forget",
        "method": config.method.name,
        "config": json.loads(config.to_json_best_effort()),
        "seeds": {"run": int(config.seed), "data": int(config.data.seed), "requests": int(config.requests.seed)},
        "environment": env,
        "splits": splits,
        "train_seconds": meta.get("train_seconds"),
        "initial": meta.get("initial"),
        "requests": requests,
        "summary": summary,
        "recompilations_between_requests": meta.get("recompilations_between_requests"),
        "compile_seconds_in_requests": meta.get("compile_seconds_in_requests"),
        "peak_host_rss_mib": meta.get("peak_host_rss_mib"),
        "method_details": meta.get("method_details"),
        "method_readouts": meta.get("method_readouts"),
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


def figure(**kwargs):
    """A matplotlib ``Figure`` (no pyplot: never switches the caller's, e.g. a notebook's, backend). matplotlib is
    imported here, on the first plot, so that ``import jaxforget`` does not load it."""
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    return Figure(**kwargs)


def save_figure(fig, path: str) -> None:
    """Writes a matplotlib figure as PNG atomically (a temporary file, then renamed)."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_requests(rep: dict, path: str) -> None:
    """Accuracy on forget/retain/test (method vs retrain) and distance to the retrain, per request."""
    reqs = rep["requests"]
    if not reqs:
        return
    k = [r["request"] for r in reqs]
    fig = figure(figsize=(12, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, color in (("forget", "C3"), ("retain", "C0"), ("test", "C2")):
        ax1.plot(k, [r["readouts"][name]["accuracy"] for r in reqs], "o-", color=color, label=f"{name} (method)")
        ax1.plot(k, [r["readouts"][name]["oracle_accuracy"] for r in reqs], "x--", color=color,
                 label=f"{name} (retrain)")
    ax1.set(xlabel="request", ylabel="accuracy", title=f"Accuracy: {rep['method']} vs retrain from scratch")
    ax1.legend(fontsize=7, ncol=2)
    ax2.semilogy(k, [max(r["rel_weight_distance"], 1e-300) for r in reqs], "o-",
                 label="‖θ − θ_r‖/‖θ_r‖ (noiseless)")
    ax2.semilogy(k, [max(r["influence_left"], 1e-300) for r in reqs], "s-", label="influence left")
    names = sorted({n for r in reqs for n in r["retrain"] if n != "retrain"})
    for i, name in enumerate(names):
        vals = [r["retrain"].get(name, {}).get("rel_error") for r in reqs]
        if any(v is not None for v in vals):
            ax2.semilogy(k, vals, "^--", color=f"C{4 + i}", label=f"{name} rel. error")
    ax2.set(xlabel="request", ylabel="relative distance", title="Distance to the retrain from scratch")
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def markdown_table(rep: dict) -> str:
    """The README results table for one forget-job report: final readouts with the retrain values beside them."""
    s = rep["summary"]
    fin = s["final"]
    name = rep["method"]
    lines = [
        f"Method: {name}; requests: {s['num_requests']} × {rep['requests'][0]['forget']['num_forgotten']}"
        f" ids; device: {rep['environment']['device_kind']}; jax {rep['environment']['jax']}.",
        "",
        f"| readout (after the last request) | {name} forget | retrain from scratch |",
        "|---|---|---|",
    ]
    for split in ("forget", "retain", "test"):
        lines.append(f"| accuracy on {split} | {fin[split]['accuracy']:.4f} | {fin[split]['oracle_accuracy']:.4f} |")
    for split in ("forget", "retain", "test"):
        lines.append(f"| activation distance on {split} | {fin[split]['activation_distance']:.2e} | 0 |")
    lines += [
        f"| max ‖θ − θ_r‖/‖θ_r‖ over requests (noiseless) | {s['max_rel_weight_distance']:.2e} | 0 |",
        f"| max share of a request's influence left | {s['max_influence_left']:.2e} | 0 |",
        f"| median solver iterations per request | {s['median_iterations']:.0f} | |",
        f"| median forget time (s) | {s['median_forget_seconds']:.3f} | |",
    ]
    for baseline, v in s["median_speedup_vs_retrain"].items():
        err = rep["requests"][-1]["retrain"][baseline].get("rel_error")
        err = "diverged (NaN)" if err is None else f"{err:.2e}"
        label = "the retrain (gold standard)" if baseline == "retrain" else baseline
        lines.append(f"| median speed-up vs {label} (rel. error of that retrain: {err}) | {v:.2f}× | 1× |")
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


# ---------------------------------------------------------------------------------------------------------------------
# Comparison reports (spec evaluation.md §10): every method on >= 3 seeds, each number beside its retrain reference
# and the original model's value. Judged by closeness to retrain only; nothing here calls a lower number "better".

COMPARE_SCHEMA_VERSION = 2
EFFICIENT_RATIO = 0.2  # the NeurIPS'23 challenge's pass line on T_unlearn / T_retrain (spec §9)
CRITERIA = ("closest_to_retrain", "stop_count")
COMPARE_REQUIRED_KEYS = ("config", "seeds", "metrics", "methods", "versions", "devices")
_STAT_KEYS = ("n", "mean", "std", "retrain_mean", "retrain_std", "original_mean", "mean_gap", "mean_abs_gap")
_TOL = 1e-12  # stored statistics must equal their recomputation from per_seed to this (absolute, or relative if > 1)
_SPLIT_ORDER = ("forget", "retain", "test", "val")
_MODEL_ORDER = ("original", "unlearned", "retrain")
_SPLIT_COLORS = {"forget": "C3", "retain": "C2", "test": "C0", "val": "C1"}


def _number(x, what: str):
    """A per-seed value made JSON-safe: ints stay ints, floats become float64, None/NaN/±Inf/"n/a" become None.

    Anything else (a bool, a list, another string) raises: a malformed value must not pass as "n/a".
    """
    if x is None or (isinstance(x, str) and x.strip().lower() == "n/a"):
        return None
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} is {x!r}: expected a number, None or 'n/a'.")
    if isinstance(x, (int, np.integer)):
        return int(x)
    return float(x) if math.isfinite(float(x)) else None


def _mean_std(values) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1) in host float64.

    Both are None when any value is missing: a partial average would hide the missing seeds. std is None for n = 1.
    """
    if len(values) == 0 or any(v is None for v in values):
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _record_stats(per_seed: list[dict]) -> dict:
    """The statistics of a metric record (keys ``_STAT_KEYS``), recomputed from its normalised per-seed rows."""
    vals = [p.get("value") for p in per_seed]
    rets = [p.get("retrain_value") for p in per_seed]
    mean, std = _mean_std(vals)
    retrain_mean, retrain_std = _mean_std(rets)
    original_mean, _ = _mean_std([p.get("original_value") for p in per_seed])
    mean_gap = mean_abs_gap = None
    if mean is not None and retrain_mean is not None:
        gap = np.asarray(vals, dtype=np.float64) - np.asarray(rets, dtype=np.float64)
        mean_gap, mean_abs_gap = float(gap.mean()), float(np.abs(gap).mean())
    return {"n": len(per_seed), "mean": mean, "std": std, "retrain_mean": retrain_mean, "retrain_std": retrain_std,
            "original_mean": original_mean, "mean_gap": mean_gap, "mean_abs_gap": mean_abs_gap}


def _seed_row(row, where: str) -> dict:
    """One per-seed entry normalised to {seed, value, retrain_value, original_value, ...extra keys kept}."""
    if not isinstance(row, dict) or "seed" not in row or "value" not in row:
        raise ValueError(f"{where}: every per_seed entry needs 'seed' and 'value'; got {row!r}.")
    seed = row["seed"]
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{where}: per_seed seed {seed!r} is not an integer.")
    out = {"seed": int(seed), "value": _number(row["value"], f"{where} seed {seed} value")}
    for key in ("retrain_value", "original_value"):
        if key in row:
            out[key] = _number(row[key], f"{where} seed {seed} {key}")
    out.update({k: _clean(v) for k, v in row.items() if k not in out})
    return out


def _record_label(rec, index: int | None = None) -> str:
    label = f"metric {rec.get('name')!r} split={rec.get('split')!r} method={rec.get('method')!r}"
    return label if index is None else f"metrics[{index}] ({label})"


def _record_problems(rec: dict, where: str, *, seeds=None, methods=None, check_stats: bool = True) -> list[str]:
    """Everything wrong with one metric record, as messages prefixed by ``where`` (empty list: valid)."""
    if not isinstance(rec, dict):
        return [f"{where}: is {type(rec).__name__}, not a dict."]
    problems = []
    missing = [k for k in ("name", "split", "method", "per_seed", "convention", "criterion", *_STAT_KEYS)
               if k not in rec]
    if missing:
        return [f"{where}: missing keys {missing}."]
    name = rec["name"]
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: 'name' must be a non-empty string.")
    elif name.strip().upper() == "MIA":
        problems.append(f"{where}: bare name 'MIA' is not allowed; name the attack and statistic (spec ground rule 3).")
    if not isinstance(rec["convention"], str) or not rec["convention"].strip():
        problems.append(f"{where}: 'convention' must be a non-empty string saying what the value counts.")
    if not isinstance(rec.get("params", {}), dict):
        problems.append(f"{where}: 'params' must be a dict.")
    if rec["criterion"] not in CRITERIA:
        problems.append(f"{where}: criterion {rec['criterion']!r} is not one of {CRITERIA}.")
    if methods is not None and rec["method"] not in methods:
        problems.append(f"{where}: method {rec['method']!r} is not in the report's methods {list(methods)}.")
    per_seed = rec["per_seed"]
    if not isinstance(per_seed, list) or not per_seed:
        return [*problems, f"{where}: 'per_seed' must be a non-empty list."]
    try:
        rows = [_seed_row(r, where) for r in per_seed]
    except ValueError as e:
        return [*problems, str(e)]
    got = [r["seed"] for r in rows]
    if len(set(got)) != len(got):
        problems.append(f"{where}: duplicate seeds in per_seed {got}.")
    if seeds is not None and set(got) - set(seeds):
        problems.append(f"{where}: per_seed seeds {sorted(set(got) - set(seeds))} are not in the report's seeds.")
    if rec["criterion"] != "stop_count":
        for r in rows:
            if "retrain_value" not in r:
                problems.append(f"{where}: seed {r['seed']} has no retrain_value (a metric without its retrain "
                                "reference is invalid; only criterion 'stop_count' may omit it).")
            elif r["retrain_value"] is None and r["value"] is not None:
                problems.append(f"{where}: seed {r['seed']} has a value but its retrain_value is None/NaN.")
    if check_stats and not problems:
        for key, want in _record_stats(rows).items():
            have = rec[key]
            if want is None or have is None or isinstance(have, bool) or \
                    not isinstance(have, (int, float, np.integer, np.floating)):
                ok = want is None and have is None
            else:
                ok = abs(float(have) - want) <= _TOL * max(1.0, abs(want))
            if not ok:
                problems.append(f"{where}: {key}={have!r} does not match {want!r} recomputed from per_seed "
                                "(numpy float64, std with ddof=1).")
    return problems


def metric_record(name: str, split: str, method: str, per_seed: list[dict], *, convention: str,
                  params: dict | None = None, criterion: str = "closest_to_retrain") -> dict:
    """One metric record of a compare report (spec §10), its statistics computed from ``per_seed`` in float64.

    ``per_seed`` holds ``{"seed", "value", "retrain_value", "original_value"}`` per seed (extra keys such as
    ``censored`` are kept). ``std``/``retrain_std`` are sample stds (ddof = 1), None for one seed. ``mean_gap`` =
    mean(value − retrain_value), ``mean_abs_gap`` = mean |value − retrain_value|. A value of None, NaN or "n/a"
    (e.g. weight distance without a shared init) makes every statistic that needs it None: partial averages are
    never taken silently. Raises ``ValueError`` for a record the validator would reject (no retrain value unless
    ``criterion="stop_count"``, empty convention, a bare "MIA" name).

    >>> r = metric_record("accuracy", "forget", "finetune", [
    ...     {"seed": 0, "value": 0.75, "retrain_value": 0.5, "original_value": 1.0},
    ...     {"seed": 1, "value": 0.25, "retrain_value": 0.5, "original_value": 1.0}],
    ...     convention="fraction of the split classified correctly")
    >>> r["mean"], round(r["std"], 4), r["mean_gap"], r["mean_abs_gap"], r["retrain_std"]
    (0.5, 0.3536, 0.0, 0.25, 0.0)
    """
    where = _record_label({"name": name, "split": split, "method": method})
    rows = [_seed_row(r, where) for r in per_seed]
    for r in rows:  # every row carries all four fields, so a reader never has to guess about absent keys
        r.setdefault("original_value", None)
        if criterion == "stop_count":
            r.setdefault("retrain_value", None)
    rec = {"name": name, "split": split, "method": method, "params": _clean(dict(params or {})), "per_seed": rows,
           **_record_stats(rows), "convention": convention, "criterion": criterion}
    problems = _record_problems(rec, where, check_stats=False)
    if problems:
        raise ValueError("Invalid metric record:\n  " + "\n  ".join(problems))
    return rec


def timing_record(per_seed: list[dict]) -> dict:
    """The ``timings[method]`` entry: per-seed times, the mean ``time_ratio`` and ``efficient`` (mean ≤ 0.2, spec §9).

    Each entry holds ``seed``, ``seconds``, ``retrain_seconds`` and optionally ``time_ratio`` (computed as
    seconds / retrain_seconds when absent). ``efficient`` is False when the ratio is unknown.

    >>> t = timing_record([{"seed": 0, "seconds": 1.0, "retrain_seconds": 10.0},
    ...                    {"seed": 1, "seconds": 3.0, "retrain_seconds": 10.0}])
    >>> round(t["time_ratio_mean"], 12), t["efficient"]
    (0.2, True)
    """
    rows = []
    for p in per_seed:
        row = _clean(dict(p))
        if row.get("time_ratio") is None and row.get("seconds") is not None and row.get("retrain_seconds"):
            row["time_ratio"] = float(row["seconds"]) / float(row["retrain_seconds"])
        rows.append(row)
    mean, _ = _mean_std([_number(r.get("time_ratio"), "time_ratio") for r in rows])
    return {"per_seed": rows, "time_ratio_mean": mean, "efficient": mean is not None and mean <= EFFICIENT_RATIO}


def validate_compare_report(rep: dict) -> None:
    """Raises ``ValueError`` listing every problem unless ``rep`` is a valid compare report (spec §10, §12 test 7).

    Checked: the keys ``config``, ``seeds``, ``metrics``, ``methods``, ``versions``, ``devices`` are present; there is
    at least one seed; every metric record has a non-empty ``convention``, a name other than a bare "MIA", a known
    ``criterion`` and method, per-seed seeds drawn from ``seeds``, a retrain value for every seed (except
    ``stop_count`` records) and statistics equal (1e-12) to their NumPy recomputation (std with ddof = 1); timings,
    when present, have ``efficient`` consistent with ``time_ratio_mean ≤ 0.2``. ``kind`` and ``schema_version`` are
    checked only when present.
    """
    if not isinstance(rep, dict):
        raise ValueError(f"A compare report must be a dict, not {type(rep).__name__}.")
    problems = []
    missing = [k for k in COMPARE_REQUIRED_KEYS if k not in rep]
    if missing:
        raise ValueError(f"Compare report is missing required keys {missing}.")
    if rep.get("kind", "compare") != "compare":
        problems.append(f"kind is {rep['kind']!r}, not 'compare'.")
    if rep.get("schema_version", COMPARE_SCHEMA_VERSION) != COMPARE_SCHEMA_VERSION:
        problems.append(f"schema_version is {rep['schema_version']!r}, expected {COMPARE_SCHEMA_VERSION}.")
    if not isinstance(rep["config"], dict):
        problems.append("config must be the resolved config as a dict.")
    seeds = rep["seeds"]
    if not isinstance(seeds, list) or not seeds:
        problems.append(f"seeds must be a non-empty list (at least 1 seed; 3 for a reported table); got {seeds!r}.")
        seeds = None
    elif any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds) or \
            len(set(seeds)) != len(seeds):
        problems.append(f"seeds must be distinct integers; got {seeds!r}.")
    methods = rep["methods"]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        problems.append(f"methods must be a non-empty list of names; got {methods!r}.")
        methods = None
    metrics = rep["metrics"]
    if not isinstance(metrics, list) or not metrics:
        problems.append("metrics must be a non-empty list of metric records.")
        metrics = []
    for i, rec in enumerate(metrics):
        where = _record_label(rec, i) if isinstance(rec, dict) else f"metrics[{i}]"
        problems += _record_problems(rec, where, seeds=seeds, methods=methods)
    for method, t in (rep.get("timings") or {}).items():
        if methods is not None and method not in methods:
            problems.append(f"timings[{method!r}]: not one of the report's methods.")
        if not isinstance(t, dict) or "efficient" not in t or "time_ratio_mean" not in t:
            problems.append(f"timings[{method!r}]: needs 'per_seed', 'time_ratio_mean' and 'efficient'.")
            continue
        ratio = t["time_ratio_mean"]
        if ratio is not None and bool(t["efficient"]) != (ratio <= EFFICIENT_RATIO):
            problems.append(f"timings[{method!r}]: efficient={t['efficient']!r} contradicts time_ratio_mean={ratio!r}"
                            f" (efficient means ≤ {EFFICIENT_RATIO}).")
    for method in rep.get("challenge") or {}:
        if methods is not None and method not in methods:
            problems.append(f"challenge[{method!r}]: not one of the report's methods.")
    if problems:
        shown = problems[:25] + ([f"... and {len(problems) - 25} more."] if len(problems) > 25 else [])
        raise ValueError("Invalid compare report:\n  " + "\n  ".join(shown))


def _fmt(x, digits: int = 3) -> str:
    """A number for a table: fixed-point, or scientific when fixed-point would print it as 0 (or it is huge)."""
    if x is None or isinstance(x, bool) or not math.isfinite(float(x)):
        return "n/a"
    x = float(x)
    if x != 0 and (abs(x) < 10.0**-digits or abs(x) >= 1e6):
        return f"{x:.{max(digits - 1, 0)}e}"
    return f"{x:.{digits}f}"


def format_mean_std(mean, std, n: int, digits: int = 3) -> str:
    """The table cell "mean ± std, n=N" (spec §10); no ± for one seed, "n/a" for a missing mean.

    >>> format_mean_std(0.91234, 0.0041, 3)
    '0.912 ± 0.004, n=3'
    >>> format_mean_std(0.91234, None, 1)
    '0.912, n=1'
    >>> format_mean_std(None, None, 3)
    'n/a'
    >>> format_mean_std(2.5e-05, 1e-06, 3)
    '2.50e-05 ± 1.00e-06, n=3'
    """
    if _fmt(mean, digits) == "n/a":
        return "n/a"
    if n == 1 or std is None:
        return f"{_fmt(mean, digits)}, n={n}"
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}, n={n}"


def _cell(text) -> str:
    """Text safe inside a Markdown table cell (a literal | would end the cell)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _metric_label(rec: dict) -> str:
    params = rec.get("params") or {}
    extra = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{rec['name']} ({extra})" if extra else str(rec["name"])


def _censored_note(rec: dict) -> str:
    k = sum(bool(p.get("censored")) for p in rec.get("per_seed", []))
    return f" ({k} censored)" if k else ""


def _avg_abs_accuracy_gap(rep: dict, method: str):
    """§3.1's summary: the mean over forget/retain/test of the accuracy |gap| (None unless all three are known)."""
    gaps = {}
    for rec in rep["metrics"]:
        if rec["method"] == method and rec["name"] == "accuracy" and rec["split"] in ("forget", "retain", "test"):
            gaps.setdefault(rec["split"], rec.get("mean_abs_gap"))
    vals = [gaps.get(s) for s in ("forget", "retain", "test")]
    return None if any(v is None for v in vals) else float(np.mean(vals))


def _time_stats(t: dict) -> tuple:
    """(ratio mean, ratio std, seconds mean, seconds std, retrain-seconds mean, retrain-seconds std, n) of a timing."""
    rows = t.get("per_seed") or []

    def col(key):
        try:
            return _mean_std([_number(r.get(key), key) for r in rows])
        except ValueError:
            return None, None

    ratio_mean, ratio_std = col("time_ratio")
    if t.get("time_ratio_mean") is not None:
        ratio_mean = t["time_ratio_mean"]
    return (ratio_mean, ratio_std, *col("seconds"), *col("retrain_seconds"), len(rows))


def _challenge_cell(c: dict, key: str, n: int) -> str:
    return format_mean_std(c.get(key), c.get(f"{key}_std"), n)


def compare_markdown(rep: dict) -> str:
    """The README/stdout tables of a compare report: one table per method, then a summary table across methods.

    Each method's table has one row per metric record (metric with its params, split) and the columns original
    (mean over seeds), method (mean ± std, n), retrain (mean ± std, n) and \\|gap\\| (mean over seeds of
    \\|method − retrain\\|; the criterion is closeness to retrain). Then come a time-ratio row marked
    "✓ efficient (≤ 0.2)" or "✗ not efficient (> 0.2)", a wall-time row, and, when the report has a ``challenge``
    section, the challenge F with the oracle-vs-oracle F in the retrain column and the challenge ``final``. The
    summary table lists per method the accuracy avg \\|gap\\| over forget/retain/test (§3.1), the time ratio, the
    efficiency flag and, with a challenge section, F, the oracle-vs-oracle F and their ratio (goal ≥ 0.9). Metric
    conventions and the report's flagged deviations/censoring follow as lists. One table per method keeps each
    table six columns wide, which stays readable in a README whatever the number of methods.
    """
    seeds = rep["seeds"]
    n_seeds = len(seeds)
    methods = list(rep["methods"])
    sizes = (rep.get("data") or {}).get("sizes") or {}
    dev = rep.get("devices") or {}
    ver = rep.get("versions") or {}
    head = f"Seeds: {', '.join(str(s) for s in seeds)} (n={n_seeds})"
    if sizes:
        head += "; sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items())
    if dev:
        head += f"; devices: {dev.get('count', '?')} × {dev.get('kind', dev.get('platform', '?'))}"
    if ver.get("jax"):
        head += f"; jax {ver['jax']}"
    if rep.get("originals"):
        head += f"; challenge/KLOM populations: originals={rep['originals']}"
    lines = [head + ".",
             "Every value is judged by its closeness to the retrain-from-scratch value: \\|gap\\| is the mean over "
             "seeds of \\|method − retrain\\| (lower is better); a value past retrain is a miss, not a win."]
    if n_seeds < 3:
        lines.append(f"**Warning: {n_seeds} seed(s); a reported table needs at least 3 (spec §10).**")
    challenge = rep.get("challenge") or {}
    timings = rep.get("timings") or {}
    for method in methods:
        lines += ["", f"**{_cell(method)}**", "",
                  f"| metric | split | original | {_cell(method)} (mean ± std) | retrain (mean ± std) | \\|gap\\| |",
                  "|---|---|---|---|---|---|"]
        for rec in rep["metrics"]:
            if rec["method"] != method:
                continue
            n = rec.get("n", len(rec.get("per_seed", [])))
            if rec.get("criterion") == "stop_count":
                retrain = "n/a (stop count)"
            else:
                retrain = format_mean_std(rec.get("retrain_mean"), rec.get("retrain_std"), n)
            lines.append(f"| {_cell(_metric_label(rec))} | {_cell(rec['split'])} | {_fmt(rec.get('original_mean'))} "
                         f"| {format_mean_std(rec.get('mean'), rec.get('std'), n)}{_censored_note(rec)} | {retrain} "
                         f"| {_fmt(rec.get('mean_abs_gap'))} |")
        if method in timings:
            t = timings[method]
            ratio, ratio_std, sec, sec_std, rsec, rsec_std, n = _time_stats(t)
            eff = t.get("efficient", ratio is not None and ratio <= EFFICIENT_RATIO)
            mark = f"✓ efficient (≤ {EFFICIENT_RATIO})" if eff else f"✗ not efficient (> {EFFICIENT_RATIO})"
            lines += [f"| time ratio T_unlearn / T_retrain | — | | {format_mean_std(ratio, ratio_std, n)} · {mark} "
                      "| 1 | |",
                      f"| wall time (s) | — | | {format_mean_std(sec, sec_std, n)} "
                      f"| {format_mean_std(rsec, rsec_std, n)} | |"]
            rows = t.get("per_seed") or []
            for name in sorted({b for r in rows for b in (r.get("baseline_seconds") or {})}):
                vals = [r["seconds"] / r["baseline_seconds"][name] if r.get("baseline_seconds", {}).get(name) else None
                        for r in rows]
                mean, std = _mean_std(vals)
                lines.append(f"| time ratio T_unlearn / T_{_cell(name)} (the method's own baseline) | — | "
                             f"| {format_mean_std(mean, std, n)} | | |")
        if method in challenge:
            c = challenge[method]
            n = len(c["epsilons"]) if isinstance(c.get("epsilons"), list) and c["epsilons"] else n_seeds
            lines += [f"| challenge F (forget score, N={c.get('n_models', '?')}) | forget | "
                      f"| {_challenge_cell(c, 'forget_score', n)} "
                      f"| {_challenge_cell(c, 'oracle_vs_oracle', n)} (oracle-vs-oracle F) | |",
                      f"| challenge final (F × accuracy ratios) | forget | | {_challenge_cell(c, 'final', n)} | | |"]
    cols = ["method", "accuracy avg \\|gap\\| (forget, retain, test)", "time ratio",
            f"efficient (≤ {EFFICIENT_RATIO})"]
    if challenge:
        cols += ["challenge F", "oracle-vs-oracle F", "F ÷ oracle-vs-oracle (goal ≥ 0.9)", "challenge final"]
    evaluation = (rep.get("evaluation_timings") or {}).get("per_method") or {}
    if evaluation:
        cols += ["evaluation s (÷ unlearning s)"]
    lines += ["", "**Summary**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for method in methods:
        t = timings.get(method)
        ratio = _time_stats(t)[0] if t else None
        eff = "n/a" if t is None else ("yes" if t.get("efficient") else "no")
        row = [_cell(method), _fmt(_avg_abs_accuracy_gap(rep, method)), _fmt(ratio), eff]
        if challenge:
            c = challenge.get(method, {})
            f, oo = c.get("forget_score"), c.get("oracle_vs_oracle")
            rel = f"{f / oo:.2f}" if f is not None and oo else "n/a"
            row += [_fmt(f), _fmt(oo), rel, _fmt(c.get("final"))]
        if evaluation:
            e = evaluation.get(method)
            row += [f"{e['total_seconds']:.2f} (× {e['evaluation_over_unlearning']:.3g})" if e else "n/a"]
        lines.append("| " + " | ".join(row) + " |")
    shared = (rep.get("evaluation_timings") or {}).get("shared")
    if shared:
        lines += ["", f"Evaluation time per seed, shared by every method: populations "
                      f"{shared['population_seconds']:.1f} s, retrain oracle (mean over method groups) "
                      f"{shared['oracle_solve_seconds']:.2f} s; "
                      "per method: accuracies and distances, membership attacks, relearn and the distributional "
                      "scores (the summary's last column, against the unlearning time it evaluates)."]
    conventions = dict.fromkeys((_metric_label(rec), rec.get("convention")) for rec in rep["metrics"])
    lines += ["", "Conventions:"] + [_cell(f"- `{label}`: {conv}") for label, conv in conventions]
    flags = rep.get("flags") or {}
    notes = [f"- deviation: {_as_text(d)}" for d in flags.get("deviations") or []]
    notes += [f"- censored: {k}: {_as_text(v)}" for k, v in (flags.get("censored") or {}).items() if v]
    notes += [f"- compiled inside the timed request (its time includes compilation): {k}: {_as_text(v)}"
              for k, v in (flags.get("compiled_in_timed_request") or {}).items() if v]
    if notes:
        lines += ["", "Flags:", *notes]
    return "\n".join(lines)


def _as_text(x) -> str:
    return x if isinstance(x, str) else json.dumps(_clean(x), sort_keys=True, ensure_ascii=False)


def _ordered(names, preferred) -> list:
    """``names`` with the ``preferred`` ones first (in that order), the rest in their own order."""
    names = list(dict.fromkeys(names))
    return [p for p in preferred if p in names] + [n for n in names if n not in preferred]


def plot_compare_accuracy(rep: dict, path: str) -> None:
    """Accuracy (%) per split, mean ± std over seeds per method, over the retrain mean ± std band; original as ◆.

    Raises ``ValueError`` when the report has no ``accuracy`` records.
    """
    recs = [r for r in rep["metrics"] if r["name"] == "accuracy" and r.get("mean") is not None]
    if not recs:
        raise ValueError("plot_compare_accuracy: the report has no accuracy metric records with a value.")
    splits = _ordered([r["split"] for r in recs], _SPLIT_ORDER)
    methods = _ordered([r["method"] for r in recs], rep.get("methods", []))
    slots = len(methods) + 1  # slot 0 is the original model
    xs = np.linspace(-0.35, 0.35, slots)
    fig = figure(figsize=(max(6.0, 1.2 * len(splits) * slots), 4.5), layout="constrained")
    ax = fig.subplots()
    labelled = set()  # one legend entry per method, at its first split
    for i, split in enumerate(splits):
        here = [r for r in recs if r["split"] == split]
        ref = next((r for r in here if r.get("retrain_mean") is not None), None)
        if ref is not None:
            m, s = 100 * ref["retrain_mean"], 100 * (ref.get("retrain_std") or 0.0)
            ax.fill_between([i - 0.45, i + 0.45], m - s, m + s, color="0.6", alpha=0.35, lw=0,
                            label="retrain (mean ± std)" if i == 0 else None)
            ax.hlines(m, i - 0.45, i + 0.45, color="0.3", lw=1.2)
        orig = next((r["original_mean"] for r in here if r.get("original_mean") is not None), None)
        if orig is not None:
            ax.plot(i + xs[0], 100 * orig, "D", color="k", ms=6, label="original" if i == 0 else None)
        for j, method in enumerate(methods):
            r = next((r for r in here if r["method"] == method), None)
            if r is None:
                continue
            yerr = None if r.get("std") is None else 100 * r["std"]
            ax.errorbar(i + xs[j + 1], 100 * r["mean"], yerr=yerr, fmt="o", capsize=4, color=f"C{j}",
                        label=None if method in labelled else f"{method} (n={r.get('n')})")
            labelled.add(method)
    ax.set_xticks(range(len(splits)), splits)
    ax.set(ylabel="accuracy (%)", title="Accuracy per split: methods (mean ± std over seeds) vs retrain band")
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def plot_time_ratios(rep: dict, path: str) -> None:
    """T_unlearn / T_retrain per method (log scale; bar = mean, dots = seeds) with the 0.2 efficiency line.

    Raises ``ValueError`` when the report has no timings.
    """
    timings = rep.get("timings") or {}
    if not timings:
        raise ValueError("plot_time_ratios: the report has no timings.")
    methods = _ordered(timings, rep.get("methods", []))
    fig = figure(figsize=(max(5.0, 1.1 * len(methods) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    shown = [EFFICIENT_RATIO, 1.0]
    for i, method in enumerate(methods):
        t = timings[method]
        ratio = _time_stats(t)[0]
        seeds = [r.get("time_ratio") for r in t.get("per_seed") or []]
        seeds = [float(v) for v in seeds if isinstance(v, (int, float)) and v is not None and v > 0]
        if ratio is not None and ratio > 0:
            ok = ratio <= EFFICIENT_RATIO
            ax.bar(i, ratio, color="C2" if ok else "C3", alpha=0.7, width=0.6)
            ax.annotate(f"{ratio:.3g}", (i + 0.32, ratio), ha="left", va="center", fontsize=8)
            shown.append(ratio)
        ax.plot([i] * len(seeds), seeds, "k.", ms=5)
        shown += seeds
    ax.set_yscale("log")
    ax.axhline(EFFICIENT_RATIO, color="k", ls="--", lw=1.2,
               label=f"efficient ≤ {EFFICIENT_RATIO} (challenge pass line)")
    ax.axhline(1.0, color="0.5", ls=":", lw=1, label="retrain = 1")
    ax.text(1.0, EFFICIENT_RATIO, f" {EFFICIENT_RATIO}", transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    ax.set_ylim(min(shown) / 3, max(shown) * 3)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set(ylabel="T_unlearn / T_retrain", title="Time ratio per method (bars: mean, dots: seeds)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _num_buckets(n_models: int) -> int:
    """B = ceil(ln(N − 1)) of the NeurIPS'23 score (spec §7): the scorer's bucket count is 2B."""
    return distributional.num_buckets(n_models) // 2


_epsilon_points = distributional.points


def _flat(values) -> np.ndarray:
    """Finite float64 values of an array or a (possibly ragged) nest of per-seed lists."""
    try:
        a = np.asarray(values, dtype=np.float64).ravel()
    except ValueError:
        a = np.concatenate([_flat(v) for v in values]) if len(values) else np.zeros(0)
    return a[np.isfinite(a)]


def plot_epsilons(epsilons_by_method: dict, n_models: int, path: str) -> None:
    """Per-example ε histogram of the challenge score: share of examples per bucket [k/2, k/2+½), per method.

    The points each bucket earns (2^−k; ε ≥ B = ceil(ln(N − 1)) earns 0) are printed above it, and each legend
    entry carries F = the mean points of that method's pooled examples. Values may be arrays or per-seed lists.
    """
    B = _num_buckets(n_models)
    n_b = 2 * B + 1  # the last bucket collects ε ≥ B (0 points), including the degenerate rule's 50
    labels = [f"[{k / 2:g}, {k / 2 + 0.5:g})" for k in range(2 * B)] + [f"≥ {B}"]
    methods = list(epsilons_by_method)
    fig = figure(figsize=(max(6.0, 0.55 * n_b * max(1, len(methods)) ** 0.5 + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        eps = _flat(epsilons_by_method[method])
        if eps.size == 0:
            continue
        idx = np.where(eps < B, np.floor(2 * np.maximum(eps, 0.0)), 2 * B).astype(int)
        share = np.bincount(np.minimum(idx, 2 * B), minlength=n_b) / eps.size
        f = float(_epsilon_points(eps, n_models).mean())
        ax.bar(np.arange(n_b) - 0.4 + width * (j + 0.5), share, width=width, color=f"C{j}",
               label=f"{method} (m={eps.size}, F={f:.3f})")
    for k in range(n_b):
        pts = "0" if k == 2 * B else ("1" if k == 0 else f"$2^{{-{k}}}$")
        ax.text(k, 1.01, pts, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(n_b), labels, rotation=60, fontsize=7)
    ax.set(xlabel="per-example ε bucket", ylabel="share of forget examples")
    ax.set_title(f"Per-example ε (N={n_models}: {2 * B} buckets, B={B}); points per bucket above", pad=16)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_statistic_histograms(stats: dict, path: str) -> None:
    """Starting-kit-style overlaid histograms (density, log y) of a statistic for forget vs test, per model.

    ``stats[statistic][model][split]`` is an array of per-example values; one row per statistic (e.g. loss, φ),
    one column per model (original, unlearned, retrain first). Bins are shared across a row so the panels compare.
    """
    rows = list(stats)
    if not rows:
        raise ValueError("plot_statistic_histograms: no statistics given.")
    models = _ordered([m for s in rows for m in stats[s]], _MODEL_ORDER)
    fig = figure(figsize=(4.2 * len(models), 3.3 * len(rows)), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), len(models), squeeze=False))
    for i, stat in enumerate(rows):
        pooled = [_flat(v) for by_split in stats[stat].values() for v in by_split.values()]
        pooled = np.concatenate(pooled) if pooled else np.zeros(0)
        lo, hi = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 51)
        for j, model in enumerate(models):
            ax = axes[i, j]
            if model not in stats[stat]:
                ax.set_axis_off()
                continue
            by_split = stats[stat][model]
            for split in _ordered(by_split, ("forget", "test")):
                v = _flat(by_split[split])
                if v.size:
                    ax.hist(v, bins=bins, density=True, alpha=0.5, histtype="stepfilled",
                            color=_SPLIT_COLORS.get(split), label=f"{split} (n={v.size})")
            ax.set_yscale("log")
            ax.set(title=f"{model}", xlabel=stat, ylabel="density" if j == 0 else None)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_klom(values_by_method: dict, path: str) -> None:
    """KLOM per-example KL distributions per split: a box per method (whiskers at the 5th/95th percentile, ▲ mean).

    ``values_by_method[method][split]`` is an array of per-example KL values. The key ``"oracle_vs_oracle"``, when
    present, is the reference (spec §8: never 0): drawn as a grey box with its mean (dashed) and 95th percentile
    (dotted) across the panel. The y axis is symlog (linear below 1e-2), since KL spans orders of magnitude.
    """
    ref = values_by_method.get("oracle_vs_oracle")
    methods = [m for m in values_by_method if m != "oracle_vs_oracle"]
    if not methods and ref is None:
        raise ValueError("plot_klom: no KLOM values given.")
    splits = _ordered([s for v in values_by_method.values() for s in v], _SPLIT_ORDER)
    fig = figure(figsize=(max(4.0, 1.0 * (len(methods) + 1) + 1.5) * len(splits), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(splits), squeeze=False)[0])
    for ax, split in zip(axes, splits, strict=True):
        names = (["oracle_vs_oracle"] if ref is not None else []) + methods
        data, pos, ticks = [], [], []
        for k, name in enumerate(names):
            v = _flat(values_by_method[name].get(split, []))
            if v.size:
                data.append(v)
                pos.append(k)
                ticks.append(name.replace("_", " ") if name == "oracle_vs_oracle" else name)
        if not data:
            ax.set_axis_off()
            continue
        box = ax.boxplot(data, positions=pos, whis=(5, 95), showmeans=True, patch_artist=True, widths=0.6,
                         flierprops={"markersize": 2})
        for name, patch in zip([names[p] for p in pos], box["boxes"], strict=True):
            patch.set_facecolor("0.75" if name == "oracle_vs_oracle" else "C0")
            patch.set_alpha(0.6)
        if ref is not None and _flat(ref.get(split, [])).size:
            r = _flat(ref[split])
            ax.axhline(r.mean(), color="0.3", ls="--", lw=1, label=f"oracle-vs-oracle mean {r.mean():.3g}")
            ax.axhline(np.percentile(r, 95), color="0.3", ls=":", lw=1,
                       label=f"oracle-vs-oracle p95 {np.percentile(r, 95):.3g}")
            ax.legend(fontsize=7)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(bottom=0.0)  # KL ≥ 0; symlog would otherwise pad into negative values
        ax.set_xticks(pos, ticks, rotation=20, fontsize=8)
        ax.set(title=f"KLOM on {split}", ylabel="KL(unlearned ‖ oracle) per example (nats)" if ax is axes[0] else None)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> str:
    """CLI: ``python -m launch.report REPORT.json [--readme [README.md]]``; returns the rendered table.

    A compare report (``"kind": "compare"``) is validated, rendered by :func:`compare_markdown` and written to the
    README block ``compare``; a benchmark (``benchmark.json``) by :func:`jaxforget.benchmark.markdown` into the block
    ``benchmark``; a forget job's report by :func:`markdown_table` into the block ``results``. ``--block=NAME``
    writes another block (e.g. a second benchmark's).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("--block=")]
    argv = [a for a in argv if not a.startswith("--block=")]
    with open(argv[0]) as f:
        rep = json.load(f)
    if rep.get("kind") == "compare":
        validate_compare_report(rep)
        table, block = compare_markdown(rep), "compare"
    elif "workloads" in rep:
        from jaxforget import benchmark  # pylint: disable=import-outside-toplevel  (it imports the methods)

        table, block = benchmark.markdown(rep), "benchmark"
    else:
        table, block = markdown_table(rep), "results"
    block = chosen[-1] if chosen else block
    if "--readme" in argv[1:]:
        rest = argv[argv.index("--readme") + 1 :]
        update_readme(rest[0] if rest else "README.md", table, argv[0], block=block,
                      command=f"python -m launch.report {argv[0]} --readme"
                              + (f" --block={block}" if chosen else ""))
    else:
        print(table)
    return table
