"""A soak: many small sequential requests on one state, checking that nothing drifts (any registered method).

A deployed model serves deletion requests for months. The soak applies ``requests`` requests of ``ids_per_request``
ids each, in a seeded random order over the ids the method may forget, under the host-to-device transfer guard the
forget job uses, and records per request its wall time, the host's resident memory after it, and the compilations
it triggered. It then checks that the ledger is intact (each id marked by the request that named it, the request
count, nothing else removed) and summarises: the least-squares slope of resident memory against the request index
(MiB per 100 requests, over the second half, after allocators settle), the medians of the first and last 100
requests' times and their ratio, and the compilations after the first request (the warm-up).

Examples:
  >>> from configs import baselines_digits  # doctest: +SKIP
  >>> out = soak(baselines_digits.get_config("method=finetune,quick"), requests=50)  # doctest: +SKIP
  >>> out["ledger_intact"], out["compilations_after_first"]  # doctest: +SKIP
  (True, 0)
"""

from __future__ import annotations

import os
import resource

import jax
import ml_collections
import numpy as np

from jaxforget import methods, progress, timing

WINDOW = 100


def resident_mib() -> float:
    """The process's resident memory now (Linux ``/proc/self/statm``; elsewhere the peak so far), in MiB."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _slope_per_100(values: np.ndarray) -> float:
    """Least-squares slope of ``values`` against their index over the second half, per 100 steps."""
    tail = np.asarray(values, np.float64)[len(values) // 2 :]
    if len(tail) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(tail), dtype=np.float64), tail, 1)[0] * 100)


def soak(job: ml_collections.ConfigDict, *, requests: int, ids_per_request: int = 1, seed: int = 0) -> dict:
    """Runs the soak on ``job``'s method and data (a forget-job config) and returns its record.

    Raises:
      ValueError: more ids asked for than the method may forget.
    """
    method = methods.build(job)
    forgettable = method.forgettable_ids()
    if requests * ids_per_request > len(forgettable):
        raise ValueError(f"A soak of {requests} requests of {ids_per_request} id(s) needs {requests * ids_per_request}"
                         f" forgettable ids; method {method.name!r} has {len(forgettable)}.")
    order = np.random.default_rng(seed).permutation(forgettable)[: requests * ids_per_request]
    plan = order.reshape(requests, ids_per_request)
    method.plan_capacity(plan.size)
    state = method.init(jax.random.key(job.seed))
    seconds, memory, compiles = [], [], []
    for ids in progress.track(plan, desc=f"soak {method.name}", total=requests):
        counter = timing.CompileCounter()
        with counter, jax.transfer_guard_host_to_device("disallow"):
            (state, _), wall = timing.timed(method.forget, state, ids)
        seconds.append(wall)
        memory.append(resident_mib())
        compiles.append(counter.count)
    removed_by = np.asarray(state.ledger.removed_by)
    marked = removed_by[np.searchsorted(method.train_ids, plan)]
    intact = (int(state.ledger.num_requests) == requests
              and bool((marked == np.arange(1, requests + 1)[:, None]).all())
              and int((removed_by > 0).sum()) == plan.size)
    window = min(WINDOW, max(requests // 2, 1))
    first, last = float(np.median(seconds[:window])), float(np.median(seconds[-window:]))
    return {
        "method": method.name, "requests": requests, "ids_per_request": ids_per_request, "ledger_intact": intact,
        "window": window, "first_median_seconds": first, "last_median_seconds": last,
        "last_over_first": last / first if first > 0 else float("nan"),
        "resident_mib_first": memory[0], "resident_mib_last": memory[-1],
        "resident_mib_slope_per_100": _slope_per_100(np.asarray(memory)),
        "peak_resident_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compilations_first": compiles[0], "compilations_after_first": int(sum(compiles[1:])),
        "seconds": seconds, "resident_mib": memory,
    }


def markdown(rows: dict[str, dict]) -> str:
    """The soak table of :func:`soak` records by name."""
    lines = ["| soak | method | requests | ledger intact | first / last median ms | last ÷ first | RSS MiB first → "
             "last | RSS slope MiB per 100 requests | compilations after the first request |", "|" + "---|" * 9]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['method']} | {r['requests']} × {r['ids_per_request']} | "
                     f"{'yes' if r['ledger_intact'] else 'NO'} | {1e3 * r['first_median_seconds']:.2f} / "
                     f"{1e3 * r['last_median_seconds']:.2f} | {r['last_over_first']:.2f} | "
                     f"{r['resident_mib_first']:.0f} → {r['resident_mib_last']:.0f} | "
                     f"{r['resident_mib_slope_per_100']:+.2f} | {r['compilations_after_first']} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: str) -> str:
    """Time per request and resident memory against the request index, one line per soak (PNG)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in rows.items():
        ax_t.plot(1e3 * np.asarray(r["seconds"]), lw=0.6, label=name)
        ax_m.plot(r["resident_mib"], lw=1.0, label=name)
    ax_t.set(xlabel="request", ylabel="ms per request", yscale="log", title="time per request")
    ax_m.set(xlabel="request", ylabel="resident MiB", title="host memory")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
