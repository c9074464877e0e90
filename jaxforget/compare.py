"""The comparison job: every configured method on the same splits, seeds and requests, against retraining.

``config.methods`` maps a label to a method entry (``model``, ``method`` and optionally ``baselines``, the method's
own timed retrain recipes). Methods whose :meth:`~jaxforget.methods.base.Method.retrain_key` agree share one original
and one cached retrain oracle per seed (e.g. every classifier baseline of one model and recipe). For each seed (which
fixes initialisations, data orders, the request draw and the noise keys):

1. train each group's original on ``D`` (``method.init``);
2. draw the request ``D_f`` from the ids every method may forget (a fixed fraction of them, ``forget_size`` of them,
   or all of them of class ``forget_class``: :func:`draw_request`) and a disjoint warm-up request of its size;
3. get each group's retrain oracle from the cache or compute it (``method.retrain``), and, for the distributional
   scores, two populations of ``n_models`` retrains;
4. run every method once to compile (on the warm-up request), then timed;
5. read out accuracies, distances, the named membership attacks, relearn time, the KL proxy of noisy mechanisms, the
   challenge ε-score (with the oracle-vs-oracle reference) and KLOM — every value beside the retrain value and the
   original model's value.

The report (``workdir/report.json``, ``kind="compare"``) aggregates over seeds (mean ± sample std), and
``compare.md`` plus PNG plots are written beside it. The job talks to methods only through the contract.

Populations for the challenge score and KLOM (``config.eval.originals``):
* ``"single"`` (the challenge's protocol): one original per seed; the unlearned population is ``N`` runs of the method
  with their own keys, and each retrain population ``N`` retrains with their own keys, published by the method's own
  output randomisation (``method.publish``; mixed-linear: ``w* + σε`` on the same core). A deterministic method then
  has zero spread and scores ``ε = 50`` by design (spec §11.7).
* ``"per_model"`` (KLOM's protocol, an extension of the challenge, recorded as such): ``N`` independently trained
  originals (``method.init_population``), each unlearned once, against ``2N`` independent retrains on ``D_r``
  (``method.retrain_population``; cached). The spread is that of training itself.

Choices where the specs are silent (recorded in the report's ``flags.deviations``):
* Readouts of the retrain model use the noiseless gold standard; the unlearned model is what the method publishes.
* Relearn time fine-tunes the published model with its own objective (``method.fit``) on ``D_f`` plus a fixed-seed
  retain sample (``forget_plus_retain``); ``τ`` is halfway between the original's and the retrain's forget loss.
* ``T_retrain`` is the method's gold-standard retrain, timed in the same process (or recorded in the cache entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from jaxforget import compat, distributional, errors, evaluate, methods, mia, oracle, progress, report, timing
from jaxforget import config as config_lib
from jaxforget import data as data_lib
from jaxforget import experiment as experiment_lib
from jaxforget import mesh as mesh_lib

SPLITS = ("forget", "retain", "test")
POPULATION_ROLES = {"unlearned": 1, "retrain_a": 2, "retrain_b": 3}


def population_seeds(seed: int, role: str, n_models: int) -> list[int]:
    """Disjoint integer seeds for the populations of one job seed (initialisation + data order)."""
    if n_models > 10_000:
        raise ValueError(f"n_models = {n_models} > 10,000 would overlap the population seed ranges.")
    base = 1_000_000 * (1 + int(seed)) + 10_000 * POPULATION_ROLES[role]
    return [base + i for i in range(n_models)]


def _keys(seeds) -> list[jax.Array]:
    return [jax.random.key(s) for s in seeds]


def _label_key(seed: int, label: str) -> jax.Array:
    """The per-method key of a seed: independent of which other methods run."""
    return jax.random.fold_in(jax.random.key(seed), int(hashlib.sha256(label.encode()).hexdigest()[:7], 16))


def _logits(method, state, sets) -> dict[str, np.ndarray]:
    return {name: np.asarray(method.predict(state, ds.x)) for name, ds in sets.items()}


def _split_logits(logits: dict[str, np.ndarray], sets) -> dict[str, mia.SplitLogits]:
    return {name: mia.SplitLogits(logits[name], sets[name].y, sets[name].ids) for name in SPLITS}


# The statistic each single-record attack reads, to name its row when the attack cannot run.
_ATTACK_STATISTIC = {"lr_loss_cv": "loss", "svc_entropy": "entropy", "lira_conf": "logit_conf"}


def _mia_records(models_logits: dict[str, dict[str, np.ndarray]], sets, seed: int) -> list[dict]:
    inputs = {role: _split_logits(lg, sets) for role, lg in models_logits.items()}
    out = []
    for name in ("lr_loss_cv", "svc_entropy", "svc_features", "lira_conf"):
        try:
            rec = mia.attack_all_models(mia.ATTACKS[name], inputs, seed=seed)
        except mia.AttackInputError as err:
            # A small request (random erasure of k = 1 id) is below some attacks' sample minimum: that attack is
            # reported n/a with the reason rather than ending the comparison.
            rec = {"attack": name, "statistic": _ATTACK_STATISTIC.get(name, "n/a"), "value": None,
                   "value_retrain": None, "value_original": None, "convention": f"n/a: {err}"}
        out.extend(rec if isinstance(rec, list) else [rec])
    return out


def _challenge(phi: dict, accs: dict) -> tuple[dict, dict]:
    """The challenge score of the method's population vs retrain population A, and of B vs A (the reference).

    A population whose spread is below the metric's 0.01-unit threshold grid leaves ε undefined (the reference
    implementation fails there as well): the error is recorded and the score reported as n/a rather than invented.
    """
    out = []
    for unlearned, kwargs in (
        ("u", dict(retain_acc_unlearned=accs["u"]["retain"], retain_acc_retrain=accs["a"]["retain"],
                   test_acc_unlearned=accs["u"]["test"], test_acc_retrain=accs["a"]["test"])),
        ("b", None),
    ):
        try:
            if kwargs is None:
                out.append(distributional.oracle_vs_oracle(phi["b"], phi["a"]))
            else:
                out.append(distributional.challenge_score(phi[unlearned], phi["a"], **kwargs))
        except distributional.ChallengeMetricError as err:
            out.append({"error": str(err).split(":")[0] + " (population spread below the 0.01 threshold grid)"})
    return out[0], out[1]


def _distance_rows(logits, retrain_logits, original_logits) -> list[tuple]:
    rows = []
    for split in SPLITS:
        for name, fn in (("activation_distance", evaluate.activation_distance),
                         ("logit_distance", evaluate.logit_distance)):
            rows.append((name, split, fn(logits[split], retrain_logits[split]), 0.0,
                         fn(original_logits[split], retrain_logits[split])))
    return rows


def _stack_logits(per_model: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([m[name] for m in per_model]) for name in per_model[0]}


# --------------------------------------------------------------------------------------------------
# Per group: the original, the oracle, the retrain populations and the relearn probe
# --------------------------------------------------------------------------------------------------


def _relearn_probe(method, original, retrained, sets, retain_ids, forget_ids, cfg, seed) -> Callable:
    """Relearn time (spec §5) with the method's own objective; τ halfway between original and retrain.

    Returns ``rt(state)``, the relearn record of a state; the set, schedule and τ are shared by every model of the
    group, so the original's and the retrain's records are computed once and compared with each method's.
    """
    rc = cfg.eval.relearn
    relearn_ids = evaluate.relearn_set(retain_ids, forget_ids, mode=rc.mode, size=rc.size, seed=seed)
    fset = sets["forget"]

    def forget_loss(state):
        return method.mean_loss(state, fset.x, fset.y)

    def train_epoch(state, epoch):
        return method.fit(state, relearn_ids, epochs=1, learning_rate=rc.learning_rate, batch_size=rc.batch_size,
                          momentum=rc.momentum, seed=seed * 1000 + epoch)

    tau = 0.5 * (forget_loss(original) + forget_loss(retrained))
    return lambda state: evaluate.relearn_time(train_epoch, forget_loss, state, tau=tau, max_epochs=rc.max_epochs)


def _retrain_populations(method, state_r, sets, cfg, seed, n_models, cache) -> tuple[oracle.OracleEntry, dict]:
    """``2N`` published retrains on ``D_r`` (populations A and B), cached: independent originals' recipes
    (``per_model``) or the retrain of the one original with ``2N`` keys (``single``)."""
    originals = cfg.eval.originals
    seeds = population_seeds(seed, "retrain_a", n_models) + population_seeds(seed, "retrain_b", n_models)
    key = oracle.method_key(method, state_r, sets=sets, seeds=seeds, n_models=len(seeds),
                            tag=f"retrain_population:{originals}")

    def train_fn():
        start = time.perf_counter()
        keys = _keys(seeds)
        if originals == "per_model":
            retrains = method.retrain_population(state_r, keys)
        else:
            retrains = [method.retrain(state_r, k) for k in progress.track(keys, desc="retrain population")]
        published = [method.publish(s, jax.random.fold_in(k, 1)) for s, k in zip(retrains, keys, strict=True)]
        seconds = (time.perf_counter() - start) / len(seeds)
        entry = oracle.population_entry(method, published, [seconds] * len(seeds), sets,
                                        meta={"originals": originals})
        return oracle.OracleEntry(params=None, logits=entry.logits, accuracies=entry.accuracies,
                                  train_seconds=entry.train_seconds, meta=entry.meta)

    return cache.get_or_train(key, len(seeds), train_fn)


def _group(method, label_methods, forget_ids, sets, config, seed, cache) -> dict:
    """The shared part of one seed for a group of methods with one original and one retrain."""
    n_models = int(config.eval.n_models)
    original, original_seconds = timing.timed(method.init, jax.random.key(seed))
    positions = method.validate_request(original, forget_ids)
    state_r = method.with_ledger(original, original.ledger.record(positions))
    entry, oracle_info, retrained = oracle.retrain_oracle(method, state_r, cache=cache, sets=sets, seed=seed)
    start = time.perf_counter()
    pop_entry, pop_info = _retrain_populations(method, state_r, sets, config, seed, n_models, cache)
    unlearned_originals = None
    if config.eval.originals == "per_model":
        unlearned_originals = method.init_population(_keys(population_seeds(seed, "unlearned", n_models)))
    retain_ids = np.setdiff1d(method.forgettable_ids(), forget_ids)
    relearn = _relearn_probe(method, original, retrained, sets, retain_ids, forget_ids, config, seed)
    logits = {"retrain": {k: v[0] for k, v in entry.logits.items()}, "original": _logits(method, original, sets)}
    return {
        "original": original, "original_seconds": original_seconds, "state_r": state_r, "entry": entry,
        "oracle": {"source": oracle_info["source"], "key": oracle_info["key"],
                   "seconds": float(entry.train_seconds[0]), "population_source": pop_info["source"]},
        "pop_a": {k: v[:n_models] for k, v in pop_entry.logits.items()},
        "pop_b": {k: v[n_models:] for k, v in pop_entry.logits.items()},
        "unlearned_originals": unlearned_originals, "population_seconds": time.perf_counter() - start,
        "logits": logits, "relearn": relearn,
        "rl": {"retrain": relearn(retrained), "original": relearn(original)}, "members": label_methods,
    }


# --------------------------------------------------------------------------------------------------
# Per method
# --------------------------------------------------------------------------------------------------


def _unlearned_population(method, group, forget_ids, sets, config, seed, label) -> dict[str, np.ndarray]:
    """Logits ``[N, n, K]`` of ``N`` unlearned models: each independent original forgotten once (``per_model``), or
    the one original forgotten with ``N`` keys (``single``)."""
    n_models = int(config.eval.n_models)
    base_key = jax.random.fold_in(_label_key(seed, label), 2)
    originals = group["unlearned_originals"] or [group["original"]] * n_models
    out = []
    for i, original in enumerate(progress.track(originals, desc=f"{label} population")):
        state, _ = method.forget(original, forget_ids, key=jax.random.fold_in(base_key, i))
        out.append(_logits(method, state, sets))
    return _stack_logits(out)


def _method_rows(label, method, entry_config, group, forget_ids, warm_ids, sets, config, seed) -> dict:
    """Everything measured for one method on one seed."""
    n_models = int(config.eval.n_models)
    original = group["original"]
    key = _label_key(seed, label)
    method.warm_up(original, warm_ids, tuple(entry_config.baselines))  # compiles on a disjoint request
    compiles = timing.CompileCounter()
    with compiles:
        state, info = method.forget(original, forget_ids, key=jax.random.fold_in(key, 1))
    t_eval = time.perf_counter()
    lg = _logits(method, state, sets)
    retrain_lg, original_lg = group["logits"]["retrain"], group["logits"]["original"]
    rows = []
    for split in SPLITS:
        rows.append(("accuracy", split, evaluate.accuracy(lg[split], sets[split].y),
                     evaluate.accuracy(retrain_lg[split], sets[split].y),
                     evaluate.accuracy(original_lg[split], sets[split].y)))
    rows += _distance_rows(lg, retrain_lg, original_lg)
    w_star = group["entry"].params["flat"][0]
    w_orig = oracle.flat_params(method.params(original))
    w_mean = oracle.flat_params(method.params(info.noiseless if info.noiseless is not None else state))
    wd = evaluate.weight_distance(w_mean, w_star, w_orig)
    rows.append(("weight_distance", "params", wd["l2"], 0.0, evaluate.weight_distance(w_orig, w_star)["l2"]))
    rows.append(("weight_distance_relative_to_original", "params", wd["relative_to_original"], 0.0, 1.0))
    if info.sigma > 0:
        rows.append(("kl_proxy_nats", "params", evaluate.kl_proxy(w_mean, w_star, info.sigma), 0.0,
                     evaluate.kl_proxy(w_orig, w_star, info.sigma)))
    t_mia = time.perf_counter()
    for rec in _mia_records({"unlearned": lg, "retrain": retrain_lg, "original": original_lg}, sets, seed):
        rows.append((f"{rec['attack']}[{rec['statistic']}]", "forget", rec["value"], rec["value_retrain"],
                     rec["value_original"], rec["convention"]))
    t_relearn = time.perf_counter()
    rl = group["rl"] | {"unlearned": group["relearn"](state)}
    rows.append(("relearn_epochs", "forget", rl["unlearned"]["epochs"], rl["retrain"]["epochs"],
                 rl["original"]["epochs"], "epochs of fine-tuning until the forget loss ≤ τ (the method's own loss)",
                 {"censored": rl["unlearned"]["censored"] or rl["retrain"]["censored"], "tau": rl["unlearned"]["tau"]}))

    # Distributional: N unlearned models vs N retrains (population A); oracle-vs-oracle from population B.
    t_dist = time.perf_counter()
    pop_u = _unlearned_population(method, group, forget_ids, sets, config, seed, label)
    pops = (("u", pop_u), ("a", group["pop_a"]), ("b", group["pop_b"]))
    phi = {role: mia.logit_conf(p["forget"].reshape(-1, p["forget"].shape[-1]),
                                np.tile(sets["forget"].y, n_models)).reshape(n_models, -1) for role, p in pops}
    accs = {role: {s: np.array([evaluate.accuracy(p[s][i], sets[s].y) for i in range(n_models)])
                   for s in ("retain", "test")} for role, p in pops}
    challenge, challenge_ref = _challenge(phi, accs)
    klom, klom_ref = {}, {}
    for split in SPLITS:
        margins = {role: mia.margin(p[split].reshape(-1, p[split].shape[-1]),
                                    np.tile(sets[split].y, n_models)).reshape(n_models, -1) for role, p in pops}
        klom[split] = distributional.klom(margins["u"], margins["a"])
        klom_ref[split] = distributional.klom(margins["b"], margins["a"])
        rows.append(("klom_mean", split, float(np.nanmean(klom[split])), float(np.nanmean(klom_ref[split])), None,
                     "mean per-example KL(unlearned ‖ retrain) of margin histograms; retrain column: oracle-vs-oracle"))
    t_end = time.perf_counter()
    baselines = {}
    reference_params = evaluate.unravel64(w_star, method.params(state))
    for name in entry_config.baselines:
        rec = method.run_baseline(name, group["state_r"], info=info, reference=reference_params)
        if rec is not None:
            baselines[name] = rec["seconds"]
    return {
        "rows": rows, "seconds": info.seconds, "info": info.to_json(), "compilations": compiles.count,
        "baseline_seconds": baselines,
        "evaluation_seconds": {"accuracy_and_distances": t_mia - t_eval, "membership_attacks": t_relearn - t_mia,
                               "relearn": t_dist - t_relearn, "distributional": t_end - t_dist},
        "challenge": {"forget_score": challenge.get("forget_score"), "final": challenge.get("final"),
                      "oracle_vs_oracle": challenge_ref.get("forget_score"),
                      "epsilons": np.asarray(challenge.get("epsilons", [])).tolist(), "n_models": n_models,
                      "error": challenge.get("error") or challenge_ref.get("error")},
        "klom": {s: v.tolist() for s, v in klom.items()},
        "klom_reference": {s: v.tolist() for s, v in klom_ref.items()},
        "logits": lg,
    }


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def build_methods(config: ml_collections.ConfigDict) -> dict[str, methods.Method]:
    """One method object per entry of ``config.methods``, all on the same splits and mesh."""
    if not config.methods:
        raise ValueError("compare: config.methods is empty.")
    splits = data_lib.get_splits(config.data)
    device_mesh = mesh_lib.make_mesh(config.num_devices or None)
    built = {}
    for label, entry in config.methods.items():
        job = ml_collections.ConfigDict({"data": config.data, "model": entry.model, "method": entry.method,
                                         "num_devices": config.num_devices})
        built[label] = methods.build(job, splits=splits, mesh=device_mesh)
        unknown = sorted(set(entry.baselines) - set(built[label].baselines()))
        if unknown:
            raise KeyError(f"compare: methods.{label}.baselines {unknown} are not baselines of method "
                           f"{built[label].name!r}; valid: {list(built[label].baselines())}.")
    return built


def draw_request(config: ml_collections.ConfigDict, common, train: data_lib.Dataset,
                 seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """A seed's request ``D_f``, its disjoint warm-up request of the same size, and the selection record.

    ``common`` holds the ids every method may forget, ``train`` labels them. ``forget_class >= 0``: every common id
    of that class, warmed up on as many ids drawn from the other classes (a class request of another class would
    have another size); else ``forget_size`` ids (or ``round(forget_fraction · |common|)``) drawn with ``seed``.
    The record (``select``, ``size``, ``fraction`` (None unless it set the size), ``class`` (None for a random
    draw)) goes into the report's ``data.selection``.

    Raises:
      ConfigError: naming the field: a class that is not a label of the data or has no common ids, or a request
        with no disjoint warm-up request of its size.
    """
    common = np.asarray(common)
    if config.forget_class >= 0:
        label = int(config.forget_class)
        forget_ids = experiment_lib.class_ids(common, train.y[train.index_of(common)], label,
                                              num_classes=int(train.num_classes), what="compare: forget_class")
        others = np.setdiff1d(common, forget_ids)
        if len(others) < len(forget_ids):
            raise errors.ConfigError(f"compare: forget_class = {label}: its {len(forget_ids)} ids need a warm-up "
                                     f"request of as many ids from the other classes, which hold {len(others)}.")
        warm_ids = data_lib.draw_disjoint(others, 1, len(forget_ids), seed=seed)[0]
        return forget_ids, warm_ids, {"select": "class", "size": len(forget_ids), "fraction": None, "class": label}
    size = int(config.forget_size) or max(1, int(round(config.forget_fraction * len(common))))
    if 2 * size > len(common):
        field = (f"forget_size = {config.forget_size}" if config.forget_size
                 else f"forget_fraction = {config.forget_fraction}")
        raise errors.ConfigError(f"compare: {field}: a request of {size} ids leaves no disjoint warm-up request of "
                                 f"the same size among the {len(common)} ids every method may forget.")
    forget_ids, warm_ids = data_lib.draw_disjoint(common, 2, size, seed=seed)
    fraction = None if config.forget_size else float(config.forget_fraction)
    return forget_ids, warm_ids, {"select": "random", "size": size, "fraction": fraction, "class": None}


def run_seed(config: ml_collections.ConfigDict, built: dict[str, methods.Method], seed: int,
             cache: oracle.OracleCache) -> dict:
    """Everything measured for one seed: per-method readouts (with retrain and original values) and timings."""
    labels = list(built)
    first = built[labels[0]]
    common = first.forgettable_ids()
    for m in built.values():
        common = np.intersect1d(common, m.forgettable_ids())
    forget_ids, warm_ids, selection = draw_request(config, common, first.splits.train, seed)
    sets = oracle.eval_sets(first.splits, forget_ids)
    groups: dict[str, list[str]] = {}
    for label in labels:
        groups.setdefault(json.dumps(built[label].retrain_key(), sort_keys=True, default=str), []).append(label)
    shared, per_method = {}, {}
    for key, members in groups.items():
        shared[key] = _group(built[members[0]], members, forget_ids, sets, config, seed, cache)
        for label in members:
            per_method[label] = _method_rows(label, built[label], config.methods[label], shared[key], forget_ids,
                                             warm_ids, sets, config, seed)
            per_method[label]["retrain_seconds"] = shared[key]["oracle"]["seconds"]
            per_method[label]["oracle"] = shared[key]["oracle"]
    first_group = shared[next(iter(groups))]
    lg = per_method[labels[0]].pop("logits")
    for label in labels[1:]:
        per_method[label].pop("logits")
    stats_hist = {
        stat: {role: {s: fn(v[s], sets[s].y) for s in ("forget", "test")}
               for role, v in (("original", first_group["logits"]["original"]), ("unlearned", lg),
                               ("retrain", first_group["logits"]["retrain"]))}
        for stat, fn in (("loss", mia.loss), ("logit_conf", mia.logit_conf))
    }
    return {
        "seed": seed, "methods": per_method, "sizes": {s: len(ds) for s, ds in sets.items()}, "selection": selection,
        "forget_ids_sha256": hashlib.sha256(np.sort(forget_ids).astype(np.int64).tobytes()).hexdigest(),
        "population_seconds": float(np.mean([g["population_seconds"] for g in shared.values()])),
        "oracle_seconds": float(np.mean([g["oracle"]["seconds"] for g in shared.values()])),
        "oracles": {label: per_method[label]["oracle"] for label in labels}, "stats_hist": stats_hist,
        "details": {label: built[label].describe(shared_state) for label, shared_state in
                    ((lb, shared[k]["original"]) for k, members in groups.items() for lb in members)},
    }


@compat.host_blas_threads(1)  # see compat.host_blas_threads: XLA keeps the cores while timing
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every method of ``config.methods`` on ``config.seeds``; writes the report, its table and plots."""
    os.makedirs(workdir, exist_ok=True)
    config_lib.validate_compare(config)
    seeds = [int(s) for s in config.seeds]
    built = build_methods(config)
    labels = list(built)
    cache = oracle.OracleCache(config.eval.oracle_cache or os.path.join(workdir, "oracle_cache"))
    results = []
    eta = progress.Eta(len(seeds), "seeds")
    for seed in seeds:
        results.append(run_seed(config, built, seed, cache))
        eta.step(f"seed {seed} done")
    rep = _assemble(config, seeds, labels, results, built)
    report.validate_compare_report(rep)
    report.write_json(rep, os.path.join(workdir, "report.json"))
    with open(os.path.join(workdir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(report.compare_markdown(rep) + "\n")
    report.plot_compare_accuracy(rep, os.path.join(workdir, "accuracy.png"))
    report.plot_time_ratios(rep, os.path.join(workdir, "time_ratio.png"))
    defined = {m: rep["challenge"][m]["epsilons"] for m in labels if rep["challenge"][m]["forget_score"] is not None}
    if defined:
        report.plot_epsilons(defined, int(config.eval.n_models), os.path.join(workdir, "epsilons.png"))
    report.plot_statistic_histograms(results[0]["stats_hist"], os.path.join(workdir, "statistics.png"))
    klom_plot = {m: {s: np.concatenate([r["methods"][m]["klom"][s] for r in results]) for s in SPLITS}
                 for m in labels}
    klom_plot["oracle_vs_oracle"] = {s: np.concatenate([r["methods"][labels[0]]["klom_reference"][s]
                                                        for r in results]) for s in SPLITS}
    report.plot_klom(klom_plot, os.path.join(workdir, "klom.png"))
    return rep


_CONVENTIONS = {
    "accuracy": "fraction of the split classified correctly (top-1)",
    "activation_distance": "mean L1 distance of softmax outputs to the retrain model, in [0, 2]",
    "logit_distance": "mean L2 distance of centred logits to the retrain model",
    "weight_distance": "‖θ − θ_r‖ over the parameters the method reports (mixed-linear: w_u on the shared core; a "
                       "classifier: every weight, retrain from the original's initialisation)",
    "weight_distance_relative_to_original": "‖θ − θ_r‖ / ‖θ_o − θ_r‖",
    "kl_proxy_nats": "½‖θ̄ − θ_r‖²/σ² (isotropic-Gaussian KL of the noisy method to the noisy retrain)",
}


def _assemble(config, seeds, labels, results, built) -> dict:
    metrics = []
    for m in labels:
        table: dict[tuple, list] = {}
        conventions: dict[tuple, str] = {}
        for r in results:
            for row in r["methods"][m]["rows"]:
                name, split, value, retrain_value, original_value = row[:5]
                entry = {"seed": r["seed"], "value": value, "retrain_value": retrain_value,
                         "original_value": original_value}
                if len(row) > 6:
                    entry.update(row[6])
                table.setdefault((name, split), []).append(entry)
                conventions[(name, split)] = row[5] if len(row) > 5 else _CONVENTIONS[name]
        for (name, split), per_seed in table.items():
            metrics.append(report.metric_record(name, split, m, per_seed, convention=conventions[(name, split)]))
    challenge = {}
    for m in labels:
        cs = [r["methods"][m]["challenge"] for r in results]

        def mean(key, cs=cs):
            vals = [c[key] for c in cs]
            return None if any(v is None for v in vals) else float(np.mean(vals))

        scores = [c["forget_score"] for c in cs]
        challenge[m] = {
            "forget_score": mean("forget_score"),
            "forget_score_std": float(np.std(scores, ddof=1)) if len(cs) > 1 and None not in scores else None,
            "final": mean("final"), "oracle_vs_oracle": mean("oracle_vs_oracle"),
            "n_models": cs[0]["n_models"], "epsilons": [c["epsilons"] for c in cs],
            "errors": [c["error"] for c in cs if c.get("error")],
        }
    timings = {m: report.timing_record([{"seed": r["seed"], "seconds": r["methods"][m]["seconds"],
                                         "retrain_seconds": r["methods"][m]["retrain_seconds"],
                                         "baseline_seconds": r["methods"][m]["baseline_seconds"],
                                         "compilations": r["methods"][m]["compilations"]} for r in results])
               for m in labels}
    evaluation = {}
    for m in labels:
        parts = {k: float(np.mean([r["methods"][m]["evaluation_seconds"][k] for r in results]))
                 for k in results[0]["methods"][m]["evaluation_seconds"]}
        total = sum(parts.values())
        forget = float(np.mean([r["methods"][m]["seconds"] for r in results]))
        evaluation[m] = {"seconds": parts, "total_seconds": total, "unlearning_seconds": forget,
                         "evaluation_over_unlearning": total / max(forget, 1e-12)}
    evaluation_shared = {"population_seconds": float(np.mean([r["population_seconds"] for r in results])),
                         "oracle_solve_seconds": float(np.mean([r["oracle_seconds"] for r in results]))}
    originals = config.eval.originals
    env = experiment_lib.environment(next(iter(built.values())).mesh)
    return {
        "schema_version": report.COMPARE_SCHEMA_VERSION, "kind": "compare",
        "versions": {k: env[k] for k in ("jaxforget", "python", "jax", "flax", "optax", "orbax_checkpoint", "numpy",
                                         "sklearn")},
        "devices": {"platform": env["backend"], "kind": env["device_kind"], "count": env["num_devices"],
                    "process_count": env["process_count"]},
        "config": json.loads(config.to_json_best_effort()),
        "seeds": seeds, "methods": labels,
        "method_names": {m: built[m].name for m in labels},
        "data": {"sizes": results[0]["sizes"], "forget_ids_sha256": [r["forget_ids_sha256"] for r in results],
                 "selection": results[0]["selection"]},
        "oracle": {str(r["seed"]): r["oracles"] for r in results},
        "method_details": results[0]["details"],
        "metrics": metrics, "challenge": challenge, "timings": timings,
        "evaluation_timings": {"per_method": evaluation, "shared": evaluation_shared},
        "originals": originals,
        "method_info": {m: [r["methods"][m]["info"] for r in results] for m in labels},
        "flags": {
            "efficient": {m: timings[m]["efficient"] for m in labels},
            # Compilations inside a timed request (after its warm-up): nonzero means its time includes compilation.
            "compiled_in_timed_request": {m: sum(r["methods"][m]["compilations"] for r in results) for m in labels},
            "censored": {m: sum(bool(e.get("censored")) for rec in metrics if rec["method"] == m
                                and rec["name"] == "relearn_epochs" for e in rec["per_seed"]) for m in labels},
            "deviations": [
                "retrain readouts use the noiseless gold standard; the unlearned model is the published one",
                ("challenge originals='single': one original per seed, the method's own randomness is the spread"
                 if originals == "single" else
                 "challenge originals='per_model' (extension, KLOM's protocol): N independent originals, each "
                 "unlearned once, against 2N independent retrains"),
                "relearn: forget_plus_retain set, tau halfway between original and retrain forget loss, each model "
                "fine-tuned with its own objective",
                "equal-constant challenge examples score epsilon = 0 (evaluation spec §7 deviation)",
            ],
        },
    }
