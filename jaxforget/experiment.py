"""The forget job: train, serve a planned stream of forget requests, judge each against retraining, report.

``run(config, workdir)`` is what ``python -m launch.forget --config=...`` calls, for any registered method
(``config.method.name``). For each request it measures the method and, in the same process and after warm-up, the
gold standard (``method.retrain`` on the retained data, cached by content under ``eval.oracle_cache``) and the
method's own timed baselines (``eval.baselines``). A checkpoint (state + ledger + the report so far) is written after
every request, so a killed job resumes where it stopped; ``report.json`` and the PNG plots are written atomically at
the end. Everything method-specific comes from the method's hooks (:class:`jaxforget.methods.base.Method`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxforget import checkpoint, compat, errors, evaluate, methods, oracle, progress, report, timing
from jaxforget import config as config_lib
from jaxforget import data as data_lib

PyTree = Any


def request_plan(ids, num_requests: int, fraction: float, seed: int, *, size: int = 0) -> list[np.ndarray]:
    """Disjoint random forget requests of ``size`` ids each, or (``size`` 0) of ``fraction`` of ``ids`` each (at least
    one), drawn with a fixed seed.

    Raises:
      ConfigError: the requests need more ids than ``ids`` holds (naming ``requests.size`` or ``requests.fraction``).

    Examples:
      >>> s = data_lib.make_splits(data_lib.load_digits(), seed=0)
      >>> [len(r) for r in request_plan(s.user_ids, 3, 0.01, seed=0)]
      [10, 10, 10]
      >>> [len(r) for r in request_plan(s.user_ids, 3, 0.01, seed=0, size=1)]
      [1, 1, 1]
    """
    ids = np.asarray(ids)
    count = int(size) or max(1, int(round(fraction * len(ids))))
    if num_requests * count > len(ids):
        field = f"requests.size = {size}" if size else f"requests.fraction = {fraction}"
        raise errors.ConfigError(f"{field}: {num_requests} disjoint request(s) of {count} ids need "
                                 f"{num_requests * count} ids, but the method may forget only {len(ids)}.")
    return data_lib.draw_disjoint(ids, num_requests, count, seed=seed)


def class_ids(ids, labels, label: int, *, num_classes: int, what: str) -> np.ndarray:
    """The ids of ``ids`` whose label (``labels``, by position) is ``label``, sorted.

    Raises:
      ConfigError: naming ``what``: ``label`` is not a class of the data (``[0, num_classes)``), or none of ``ids``
        has it.

    Examples:
      >>> class_ids(np.array([4, 7, 9]), np.array([1, 0, 1]), 1, num_classes=2, what="requests.classes").tolist()
      [4, 9]
    """
    if not 0 <= int(label) < num_classes:
        raise errors.ConfigError(f"{what}: class {label} is not a label of the data (0 … {num_classes - 1}).")
    out = np.sort(np.asarray(ids)[np.asarray(labels) == int(label)])
    if not out.size:
        raise errors.ConfigError(f"{what}: class {label} has no ids the method(s) may forget (all of them are "
                                 "protected, e.g. core, or absent from the training split).")
    return out


def class_plan(ids, labels, num_requests: int, classes, seed: int, *,
               num_classes: int) -> tuple[list[np.ndarray], list[int]]:
    """Whole-class requests: each every id of ``ids`` of one class, for ``classes`` (one per request) or, when empty,
    ``num_requests`` distinct classes drawn with ``seed`` among those ``ids`` hold. Returns the requests and their
    classes.

    Raises:
      ConfigError: an unknown class or one without ids (:func:`class_ids`), more requests than classes to draw,
        or ``classes`` not one per request.
    """
    labels = np.asarray(labels)
    if len(classes) == 0:
        present = np.unique(labels)
        if num_requests > present.size:
            raise errors.ConfigError(f"requests.num_requests = {num_requests} whole-class requests need as many "
                                     f"classes with forgettable ids; only {present.size} have any.")
        classes = np.random.default_rng(seed).permutation(present)[:num_requests]
    if len(classes) != num_requests:
        raise errors.ConfigError(f"requests.classes names {len(classes)} class(es) for {num_requests} request(s).")
    chosen = [int(c) for c in classes]
    return [class_ids(ids, labels, c, num_classes=num_classes, what="requests.classes") for c in chosen], chosen


def plan_requests(requests: ml_collections.ConfigDict, ids, train: data_lib.Dataset
                  ) -> tuple[list[np.ndarray], list[int | None]]:
    """The forget job's request plan from its ``requests`` section (:func:`jaxforget.config.requests_section`): the
    requests, drawn from ``ids`` (the method's forgettable ids, labelled by ``train``), and each one's class (None
    for a random draw).

    Raises:
      ConfigError: a selection the ids cannot satisfy, naming the field (:func:`request_plan`, :func:`class_plan`).
    """
    if requests.select == "class":
        ids = np.asarray(ids)
        return class_plan(ids, train.y[train.index_of(ids)], int(requests.num_requests), tuple(requests.classes),
                          int(requests.seed), num_classes=int(train.num_classes))
    plan = request_plan(ids, int(requests.num_requests), float(requests.fraction), int(requests.seed),
                        size=int(requests.size))
    return plan, [None] * len(plan)


def oracle_cache(config: ml_collections.ConfigDict, workdir: str) -> oracle.OracleCache:
    """The retrain-oracle cache of a job: ``config.eval.oracle_cache``, or ``<workdir>/oracle_cache``."""
    return oracle.OracleCache(config.eval.oracle_cache or os.path.join(workdir, "oracle_cache"))


def readouts(method: methods.Method, state, entry: oracle.OracleEntry, sets: dict) -> dict:
    """Accuracy of the method and of the retrain on each set, their activation distance, and the weight distance."""
    logits = {name: np.asarray(method.predict(state, ds.x)) for name, ds in sets.items()}
    out = evaluate.compare(logits, {name: entry.logits[name][0] for name in sets}, {k: v.y for k, v in sets.items()})
    out["weights"] = evaluate.weight_distance(oracle.flat_params(method.params(state)), entry.params["flat"][0])
    return out


def config_hash(config: ml_collections.ConfigDict, *sections: str) -> str:
    """SHA-256 (16 hex digits) of the named config sections' canonical JSON (what a resumed run must share)."""
    payload = {name: config[name].to_dict() for name in sections}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@compat.host_blas_threads(1)  # see compat.host_blas_threads: XLA keeps the cores while timing
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole job and returns the report (also written to ``workdir/report.json``), holding the workdir's
    lock; a rerun resumes from the last committed request if the job's config is the same, and names the fields
    that differ if it is not."""
    config_lib.validate_forget_job(config)
    with checkpoint.WorkdirLock(workdir):
        return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # ------------------------------------------------------------------ setup
    method = methods.build(config)
    logging.info("jaxforget forget job: method %s on %d device(s): %s", method.name, method.mesh.size,
                 method.mesh.devices.ravel().tolist())
    plan, plan_classes = plan_requests(config.requests, method.forgettable_ids(), method.splits.train)
    method.plan_capacity(sum(len(r) for r in plan))  # sizes buffers before any factorisation: one compilation
    plan_hash = hashlib.sha256(b"".join(r.astype(np.int64).tobytes() for r in plan)).hexdigest()[:16]
    run_hash = config_hash(config, "data", "model", "method")
    baselines = tuple(config.eval.baselines)
    unknown = sorted(set(baselines) - set(method.baselines()))
    if unknown:
        raise KeyError(f"eval.baselines {unknown} are not baselines of method {method.name!r}; valid: "
                       f"{list(method.baselines())}.")
    cache = oracle_cache(config, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint_max_to_keep)

    # ------------------------------------------------------------------ train or resume
    step = ckpt.latest_step()
    if step is None:
        state, train_seconds = timing.timed(method.init, jax.random.key(config.seed))
        meta = {"train_seconds": train_seconds, "requests": [], "plan_sha256": plan_hash, "config_sha256": run_hash,
                "method": method.name, "resumed_at": [], "job": _job_sections(config)}
        ckpt.save(0, state, meta)
        step = 0
    else:
        state, meta = ckpt.restore(step, method.abstract_state())
        if meta.get("plan_sha256") != plan_hash or meta.get("config_sha256", run_hash) != run_hash or meta.get(
                "job", _job_sections(config)) != _job_sections(config):
            diff = config_lib.config_diff(meta.get("job", {}), _job_sections(config))
            raise errors.ConfigError(
                f"{workdir} holds a run of method {meta.get('method')!r} with another config than this one "
                f"({method.name!r}): {'; '.join(diff) or 'a different request plan'}. Use a fresh --workdir for a "
                "new config, or rerun with the saved one.")
        meta["resumed_at"] = list(meta.get("resumed_at", [])) + [step]
        logging.info("Resumed from step %d (%d requests done).", step, step)
        print(f"resumed from checkpoint step {step}", flush=True)

    # ------------------------------------------------------------------ reference for the start state
    sets = oracle.eval_sets(method.splits, method.forgotten_ids(state))
    entry, _, _ = oracle.retrain_oracle(method, state, cache=cache, sets=sets, seed=config.seed)
    if step < len(plan):
        method.warm_up(state, plan[step], baselines)
    test = method.splits.test
    meta.setdefault("initial", {
        "test_accuracy": evaluate.accuracy(method.predict(state, test.x), test.y),
        "rel_distance_to_retrain": evaluate.weight_distance(oracle.flat_params(method.params(state)),
                                                            entry.params["flat"][0])["relative"],
    })
    meta["method_details"] = method.describe(state)  # on a resume this builds what the method builds once

    # ------------------------------------------------------------------ the request stream
    eta = progress.Eta(len(plan), "requests", done=step)
    compiles = timing.CompileCounter()
    last_info, previous = None, oracle.flat_params(method.params(state))
    for k in range(step, len(plan)):
        key = noise_key(config.requests.noise_seed, k + 1)
        with compiles, jax.transfer_guard_host_to_device("disallow"):
            # Implicit host-to-device copies are errors in the request (explicit device_put only); device-to-host
            # reads stay allowed: a request checks its residuals and its ledger on the host by design.
            new_state, info = method.forget(state, plan[k], key=key)
        sets = oracle.eval_sets(method.splits, method.forgotten_ids(new_state))
        entry, oracle_info, _ = oracle.retrain_oracle(method, new_state, cache=cache, sets=sets, seed=config.seed)
        reference = entry.params["flat"][0]
        noiseless = oracle.flat_params(method.params(info.noiseless if info.noiseless is not None else new_state))
        dist = evaluate.weight_distance(noiseless, reference)
        before = evaluate.weight_distance(previous, reference)
        retrain_seconds = float(entry.train_seconds[0])
        record = {
            "request": k + 1,
            "selection": {"select": config.requests.select, "size": len(plan[k]), "class": plan_classes[k]},
            "forget": info.to_json(),
            "oracle": {"source": oracle_info["source"], "key": oracle_info["key"], "seconds": retrain_seconds},
            "rel_weight_distance": dist["relative"],
            "influence_left": dist["l2"] / before["l2"] if before["l2"] > 0 else 0.0,
            "readouts": readouts(method, new_state, entry, sets),
            "kl_proxy_nats": evaluate.kl_proxy(noiseless, reference, info.sigma) if info.sigma > 0 else None,
            "retrain": {"retrain": {"seconds": retrain_seconds, "rel_error": 0.0}},
        }
        if baselines:
            reference_params = evaluate.unravel64(reference, method.params(new_state))
            for name in baselines:
                rec = method.run_baseline(name, new_state, info=info, reference=reference_params)
                if rec is not None:
                    record["retrain"][name] = rec
        record["speedup_vs_retrain"] = {name: r["seconds"] / max(info.seconds, 1e-12)
                                        for name, r in record["retrain"].items()}
        meta["requests"].append(record)
        state, previous, last_info = new_state, noiseless, info
        ckpt.save(k + 1, state, meta)
        eta.step(f"iterations {info.iterations}, relative distance to retrain {dist['relative']:.2e}")
    meta["recompilations_between_requests"] = compiles.count
    meta["compile_seconds_in_requests"] = compiles.seconds
    meta["peak_host_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # ------------------------------------------------------------------ method readouts and the report
    reference_params = evaluate.unravel64(entry.params["flat"][0], method.params(state))
    meta["method_readouts"] = method.readouts(state, last_info, reference_params, plots_dir=workdir, seed=config.seed)
    out = report.build(config, meta, splits=method.splits.to_json(), env=environment(method.mesh))
    report.write_json(out, os.path.join(workdir, "report.json"))
    report.plot_requests(out, os.path.join(workdir, "requests.png"))
    ckpt.close()
    return out


def noise_key(noise_seed: int | None, request: int) -> jax.Array | None:
    """Request ``request``'s noise key: ``fold_in(key(noise_seed), request)``, or ``None`` (the method draws a
    secret one) when ``noise_seed`` is ``None`` or negative."""
    if noise_seed is None or noise_seed < 0:
        return None
    return jax.random.fold_in(jax.random.key(int(noise_seed)), int(request))


def _job_sections(config: ml_collections.ConfigDict) -> dict:
    """What a resumed run must share with the run it resumes (canonical JSON: tuples and lists alike)."""
    sections = {name: config[name].to_dict() for name in ("data", "model", "method", "requests")}
    sections["eval"] = {"baselines": list(config.eval.baselines)}  # where the oracle cache lives does not matter
    return json.loads(json.dumps(sections, default=str))


def restore_latest_state(method: methods.Method, workdir: str):
    """The state of the newest checkpoint in ``workdir`` (after a finished run: the last request's)."""
    state, _, _ = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"), method.abstract_state())
    return state


def environment(device_mesh) -> dict:
    """Versions, backend and devices of this process (every report records them)."""
    import flax  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint  # pylint: disable=import-outside-toplevel
    import sklearn  # pylint: disable=import-outside-toplevel

    import jaxforget  # pylint: disable=import-outside-toplevel

    return {
        "jaxforget": jaxforget.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": orbax.checkpoint.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": int(device_mesh.size),
        "process_count": jax.process_count(),
    }
