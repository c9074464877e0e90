"""Train once, forget over time, verify: the workflow of a user who holds a deployed model and receives deletion
requests over weeks, for every registered method.

* :func:`train` (``python -m launch.train --config=... --workdir=W``) trains the original, saves it with an empty
  ledger, and writes ``W/model.json``: the method, the resolved config and the ids a request may name
  (``forgettable_ids``: the user ids of mixed-linear, the whole training set of a general network).
* :func:`forget` (``python -m launch.forget --workdir=W --ids=FILE [--request_id=R]``) applies one request to the
  saved state: validated first, then a new checkpoint step written, committed by its manifest
  (:mod:`jaxforget.checkpoint`) and swapped in, holding the new state *and* the ledger record (request id, ids,
  method, time, parameter hashes before and after, readouts). A replayed request id with the same ids is reported and
  not applied twice; with other ids it is refused.
* **Nothing forgotten stays on disk.** A workdir keeps one committed step: once a request commits, the previous step
  (the model that still held the samples) is deleted, and so are the evaluation's retrain cache and report, which
  were made for the previous retained set. :func:`verify` checks it.
* Every job holds the workdir's lock (:class:`jaxforget.checkpoint.WorkdirLock`): a second job on the same workdir
  is refused, never interleaved.
* :func:`evaluate` (``python -m launch.evaluate --workdir=W``) judges the current state against a retrain on the
  retained data (cached by content) and runs :func:`verify`: the ledger, the checkpoint and the config agree, and no
  forgotten id is in any data the current state depends on.

Examples:
  >>> import tempfile, jaxforget as jf
  >>> from configs import baselines_digits  # doctest: +SKIP
  >>> workdir = tempfile.mkdtemp()  # doctest: +SKIP
  >>> model = jf.workflow.train(baselines_digits.get_config("method=finetune,quick"), workdir)  # doctest: +SKIP
  >>> jf.workflow.forget(workdir, model["forgettable_ids"][:5], request_id="ticket-1")["status"]  # doctest: +SKIP
  'applied'
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import json
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxforget import checkpoint, errors, evaluate, experiment, methods, mia, oracle, report, timing
from jaxforget import config as config_lib

MODEL_FILE = "model.json"
LEDGER_FILE = "ledger.json"
EVALUATION_FILE = "evaluation.json"


class RequestIdError(errors.ForgetRequestError):
    """A request id that was already used for other ids."""


class WorkdirError(errors.JaxForgetError, ValueError):
    """A workdir that holds no trained model, or one trained by another method or config."""


class VerificationError(errors.JaxForgetError, RuntimeError):
    """The ledger, the checkpoint, the config or the data dependencies of a workdir disagree."""


def config_sha256(config: ml_collections.ConfigDict) -> str:
    """SHA-256 of a config's canonical JSON (tuples and lists alike): equal for a config and its saved copy."""
    canonical = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def params_sha256(tree) -> str:
    """SHA-256 of a parameter pytree's leaves (shapes, dtypes and bytes, in leaf order)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


ORACLE_CACHE = "oracle_cache"


def _ckpt(workdir: str) -> checkpoint.Checkpointer:
    # One committed step: an older one would still hold the samples a later request deleted.
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)


def _locked(fn):
    """Runs ``fn(workdir, ...)`` holding ``workdir``'s lock."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with checkpoint.WorkdirLock(signature.bind(*args, **kwargs).arguments["workdir"]):
            return fn(*args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------------
# Train
# --------------------------------------------------------------------------------------------------


@_locked
def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the original of ``config.method`` and saves it with an empty ledger; returns ``model.json``'s content.

    Rerunning with the same config on a trained workdir changes nothing (the saved model is reported).

    Raises:
      WorkdirError: the workdir holds a model of another method or config (both are named).
      ConfigError, KeyError: an invalid config or an unknown method.
    """
    config_lib.validate_forget_job(config)
    os.makedirs(workdir, exist_ok=True)
    digest = config_sha256(config)
    path = os.path.join(workdir, MODEL_FILE)
    if os.path.exists(path):
        model = read_model(workdir)
        if model["config_sha256"] != digest:
            raise WorkdirError(
                f"{workdir} already holds a model of method {model['method']!r} (config {model['config_sha256'][:12]}"
                f"); this config is method {config.method.name!r} (config {digest[:12]}), differing in "
                f"{'; '.join(config_lib.config_diff(model['config'], json.loads(config.to_json_best_effort())))}. "
                "Use a fresh --workdir.")
        print(f"{workdir} already holds this model (method {model['method']}); nothing to train.", flush=True)
        return model
    method = methods.build(config)
    logging.info("training the original of %s on %d device(s)", method.name, method.mesh.size)
    state, seconds = timing.timed(method.init, jax.random.key(config.seed))
    meta = {"kind": "model", "method": method.name, "config_sha256": digest, "train_seconds": seconds,
            "trained_at": _now(), "params_sha256": params_sha256(method.params(state)), "ledger": []}
    ckpt = _ckpt(workdir)
    try:
        if ckpt.latest_step() is not None:
            raise WorkdirError(f"{workdir}/checkpoints holds checkpoints but no {MODEL_FILE}: not a jaxforget model "
                               "workdir, or a damaged one. Use a fresh --workdir.")
        ckpt.save(0, state, meta)
    finally:
        ckpt.close()
    model = {
        "method": method.name, "config": json.loads(config.to_json_best_effort()), "config_sha256": digest,
        "splits": method.splits.to_json(), "num_train": method.num_train,
        "forgettable_ids": method.forgettable_ids().tolist(), "train_seconds": seconds,
        "test_accuracy": evaluate.accuracy(method.predict(state, method.splits.test.x), method.splits.test.y),
    }
    report.write_json(model, path)  # last: a workdir with model.json holds a complete step 0
    report.write_json({"requests": []}, os.path.join(workdir, LEDGER_FILE))
    print(f"trained {method.name} in {seconds:.1f} s; test accuracy {model['test_accuracy']:.4f}; "
          f"{len(model['forgettable_ids'])} ids may be forgotten (see {path}).", flush=True)
    return model


def read_model(workdir: str) -> dict:
    """``model.json`` of a trained workdir.

    Raises:
      WorkdirError: no trained model there (``launch.train`` first), or an unreadable file (named).
    """
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.exists(path):
        raise WorkdirError(f"{workdir} holds no trained model ({MODEL_FILE} is missing): run "
                           f"`python -m launch.train --config=... --workdir={workdir}` first.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable: {type(e).__name__}: {e}") from e


def load(workdir: str, config: ml_collections.ConfigDict | None = None):
    """``(method, state, meta, step)`` of a trained workdir's latest checkpoint.

    Args:
      workdir: a directory written by :func:`train`.
      config: optional: the config the caller expects; a different one raises, naming both.

    Raises:
      WorkdirError: no model, or one of another method or config.
    """
    model = read_model(workdir)
    saved = ml_collections.ConfigDict(model["config"])
    if config is not None and config_sha256(config) != model["config_sha256"]:
        raise WorkdirError(
            f"{workdir} holds a model of method {model['method']!r} (config {model['config_sha256'][:12]}), but the "
            f"given config is method {config.method.name!r} (config {config_sha256(config)[:12]}), differing in "
            f"{'; '.join(config_lib.config_diff(model['config'], json.loads(config.to_json_best_effort())))}; drop "
            "--config to use the workdir's own, or use another --workdir.")
    method = methods.build(saved)
    try:
        state, meta, step = checkpoint.restore_latest(os.path.join(workdir, "checkpoints"), method.abstract_state())
    except FileNotFoundError:
        raise WorkdirError(f"{workdir} has {MODEL_FILE} but no checkpoint: the training did not finish.") from None
    if meta.get("method") != method.name or meta.get("config_sha256") != model["config_sha256"]:
        raise WorkdirError(f"{workdir}: the checkpoint was written by method {meta.get('method')!r} with config "
                           f"{str(meta.get('config_sha256'))[:12]}, but {MODEL_FILE} names {method.name!r} with "
                           f"{model['config_sha256'][:12]}.")
    recorded = len(meta.get("ledger", []))
    if int(state.ledger.num_requests) != recorded:
        raise checkpoint.CorruptCheckpointError(
            f"{workdir}: checkpoint step {step} holds a state that served {int(state.ledger.num_requests)} "
            f"request(s), but its ledger records {recorded}: the step was not written by launch.forget.")
    return method, state, meta, step


# --------------------------------------------------------------------------------------------------
# Forget
# --------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[,\s;]+")


def parse_ids(spec) -> np.ndarray:
    """Request ids from a comma list (``"3,17,42"``), a sequence, or a file: ``.npy``, or text/CSV with one or more
    ids per line (commas, semicolons or whitespace between them; ``#`` starts a comment; a first line naming a
    column such as ``id`` is a header).

    Raises:
      ShapeDtypeError: a token that is not an integer, naming the file and line; EmptyRequestError: no ids.

    Examples:
      >>> parse_ids("3, 17,42").tolist()
      [3, 17, 42]
    """
    if not isinstance(spec, (str, os.PathLike)):
        return np.asarray(spec)
    text = os.fspath(spec)
    if os.path.isfile(text):
        if text.endswith(".npy"):
            try:
                return np.load(text, allow_pickle=False).ravel()
            except (OSError, ValueError) as e:
                raise errors.ShapeDtypeError(f"ids file {text} is not a readable .npy array: {e}") from e
        with open(text, encoding="utf-8") as f:
            lines, where = f.read().splitlines(), f"ids file {text}"
    else:
        lines, where = [text], "--ids"
    ids = []
    for number, line in enumerate(lines, start=1):
        tokens = [t for t in _TOKEN.split(line.split("#", 1)[0].strip()) if t]
        if number == 1 and tokens and where != "--ids" and not any(t.lstrip("+-").isdigit() for t in tokens):
            continue  # a CSV header
        for token in tokens:
            if not token.lstrip("+-").isdigit():
                raise errors.ShapeDtypeError(f"{where}, line {number}: {token!r} is not an integer id.")
            ids.append(int(token))
    if not ids:
        raise errors.EmptyRequestError(f"{where} holds no ids.")
    return np.asarray(ids, np.int64)


@_locked
def forget(workdir: str, ids, *, request_id: str | None = None,
           config: ml_collections.ConfigDict | None = None, noise_seed: int | None = None,
           retrain_when_over_budget: bool = False) -> dict:
    """Applies one deletion request to the saved state of ``workdir``, atomically, and records it in the ledger.

    Args:
      workdir: a directory written by :func:`train`.
      ids: the sample ids to forget (see :func:`parse_ids` for files and comma lists).
      request_id: a caller's name for the request (a ticket number); default ``request-<k>``. Replaying an id with
        the same ids reports it and applies nothing; with other ids raises :class:`RequestIdError`.
      config: optional: the config the caller expects the workdir to hold (a different one raises).
      noise_seed: optional: the request's noise key is ``fold_in(key(noise_seed), request number)`` (reproducible,
        and recorded in the ledger); by default the method draws a secret key that is not recorded anywhere.
      retrain_when_over_budget: when the summed residuals since the last exact state pass the config's
        ``residual_budget``, publish the method's exact retrain on the retained data instead (recorded as such).

    Returns:
      The ledger record, with ``status`` ``"applied"`` or ``"already_applied"``.

    Raises:
      RequestIdError, WorkdirError, and every error the method's validation raises (unknown, duplicate, core or
      already-forgotten ids; empty requests). The saved state and ledger are unchanged on every error.
    """
    ids = parse_ids(ids)
    method, state, meta, step = load(workdir, config)
    ledger = meta.get("ledger", [])
    _settle(workdir, step, ledger)  # a job killed after its commit left this undone
    if request_id is not None:
        previous = next((r for r in ledger if r["request_id"] == request_id), None)
        if previous is not None:
            same = sorted(previous["ids"]) == sorted(np.asarray(ids).astype(np.int64).tolist())
            if not same:
                raise RequestIdError(f"Request id {request_id!r} was already applied (request {previous['request']}, "
                                     f"{len(previous['ids'])} ids) with other ids; use a new request id.")
            print(f"request {request_id!r} was already applied at {previous['applied_at']}; nothing changed.",
                  flush=True)
            return {**previous, "status": "already_applied"}
    before = params_sha256(method.params(state))
    compiles = timing.CompileCounter()  # each request is a new process: say how much of it was compilation
    key = experiment.noise_key(noise_seed, int(state.ledger.num_requests) + 1)
    with compiles, jax.transfer_guard_host_to_device("disallow"):  # see experiment.run
        new_state, info = method.forget(state, ids, key=key)
    saved = ml_collections.ConfigDict(read_model(workdir)["config"])
    budget = float(saved.get("residual_budget", 0.01))
    spent = (ledger[-1].get("residual_total", 0.0) if ledger else 0.0) + (
        float("inf") if info.residual is None else float(info.residual))
    residual = {"request": info.residual, "total": spent, "budget": budget, "over_budget": spent > budget,
                "retrained": False}
    if residual["over_budget"]:
        what = ("reports no residual, so its forgetting is unmeasured" if info.residual is None
                else f"has left a summed residual of {spent:.3g} since the last exact state")
        if retrain_when_over_budget:
            # The exact retrain, published as the method publishes (its noise, if any: with the request's key or a
            # secret one).
            publish_key = key if key is not None else jax.random.key(int.from_bytes(os.urandom(8), "little") >> 2)
            exact, seconds = timing.timed(lambda: method.publish(method.retrain(new_state), publish_key))
            # In the saved state's own dtypes (a float64 gold standard is published like the model it replaces).
            new_state = jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), exact, new_state)
            residual.update(retrained=True, total=0.0, retrain_seconds=seconds)
            print(f"method {method.name} {what}, over the budget {budget:g}: published its exact retrain on the "
                  f"retained data instead ({seconds:.2f} s).", flush=True)
        else:
            logging.warning("method %s %s, over the residual budget %g: the published model may still carry the "
                            "forgotten samples' influence; rerun with --retrain_when_over_budget to retrain.",
                            method.name, what, budget)
            print(f"warning: method {method.name} {what}, over the residual budget {budget:g} (see "
                  "--retrain_when_over_budget).", flush=True)
    after = params_sha256(method.params(new_state))
    sets = oracle.eval_sets(method.splits, method.forgotten_ids(new_state))
    this = method.splits.train.subset(ids)
    readouts = {name: evaluate.accuracy(method.predict(new_state, ds.x), ds.y)
                for name, ds in (("request", this), ("retain", sets["retain"]), ("test", sets["test"]))}
    record = {
        "request_id": request_id or f"request-{info.request}", "request": info.request,
        "ids": np.sort(np.asarray(ids, np.int64)).tolist(), "method": method.name, "applied_at": _now(),
        "params_sha256_before": before, "params_sha256_after": after, "accuracy": readouts, "info": info.to_json(),
        "compilations": compiles.count, "compile_seconds": compiles.seconds,
        "noise": "secret" if key is None else {"seed": int(noise_seed)},
        "residual": residual, "residual_total": residual["total"],
    }
    meta = {**meta, "ledger": [*ledger, record]}
    ckpt = _ckpt(workdir)
    try:
        ckpt.save(step + 1, new_state, meta)  # committed by its manifest; the previous step is then deleted
    finally:
        ckpt.close()
    _settle(workdir, step + 1, meta["ledger"])
    print(f"forgot {len(record['ids'])} ids ({record['request_id']}) with {method.name} in {info.seconds:.3f} s; "
          f"accuracy on them {readouts['request']:.3f}, retained {readouts['retain']:.3f}, "
          f"test {readouts['test']:.3f}.", flush=True)
    return {**record, "status": "applied"}


# --------------------------------------------------------------------------------------------------
# Evaluate and verify
# --------------------------------------------------------------------------------------------------


def verify(workdir: str, *, loaded=None) -> dict:
    """Checks a workdir: the saved config, the checkpoint's parameters against the ledger's last hash, the ledger
    against the state's own, and that no forgotten id is in the data the state depends on.

    Returns:
      ``{"ok": bool, "checks": [{"check", "ok", "detail"}]}``.
    """
    method, state, meta, step = load(workdir) if loaded is None else loaded
    ledger = meta.get("ledger", [])
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    check("config", meta.get("config_sha256") == read_model(workdir)["config_sha256"],
          "the checkpoint's config hash equals model.json's")
    expected = ledger[-1]["params_sha256_after"] if ledger else meta.get("params_sha256")
    got = params_sha256(method.params(state))
    check("checkpoint", got == expected, f"parameters hash {got[:12]}, the ledger's last record says "
                                         f"{str(expected)[:12]}")
    removed_by = np.asarray(state.ledger.removed_by)
    problems = []
    if int(state.ledger.num_requests) != len(ledger):
        problems.append(f"the state counts {int(state.ledger.num_requests)} requests, the ledger {len(ledger)}")
    for r in ledger:
        pos = np.searchsorted(method.train_ids, r["ids"])
        if not (removed_by[pos] == r["request"]).all():
            problems.append(f"request {r['request_id']!r}: not every id is marked removed by request {r['request']}")
    if int((removed_by > 0).sum()) != sum(len(r["ids"]) for r in ledger):
        problems.append(f"the state marks {int((removed_by > 0).sum())} samples removed, the ledger "
                        f"{sum(len(r['ids']) for r in ledger)}")
    check("ledger", not problems, "; ".join(problems) or f"{len(ledger)} request(s), each id marked by its request")
    forgotten = method.forgotten_ids(state)
    leaked = np.intersect1d(method.depends_on(state), forgotten)
    check("data", leaked.size == 0, f"{leaked.size} forgotten id(s) in the data the state depends on"
          + (f": {leaked[:10].tolist()}" if leaked.size else ""))
    check("disk", *_disk_problems(workdir, step, forgotten))
    return {"ok": all(c["ok"] for c in checks), "step": step, "checks": checks}


def _settle(workdir: str, step: int, ledger: list) -> None:
    """What follows a commit, idempotent: no checkpoint step but ``step``; the retrain cache and evaluation report
    dropped when they predate the ledger (made for an earlier retained set: a retrain that saw since-forgotten
    samples, readouts of a superseded model); ``ledger.json`` mirroring the committed ledger."""
    path = os.path.join(workdir, LEDGER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            mirrored = len(json.load(f)["requests"])
    except (OSError, ValueError, KeyError, TypeError):
        mirrored = -1
    root = os.path.join(workdir, "checkpoints")
    if any(d.isdigit() and int(d) != step for d in os.listdir(root)):
        ckpt = _ckpt(workdir)
        try:
            ckpt.prune(keep=step)
        finally:
            ckpt.close()
    if mirrored != len(ledger):
        checkpoint.remove_tree(os.path.join(workdir, ORACLE_CACHE))
        if os.path.exists(os.path.join(workdir, EVALUATION_FILE)):
            os.remove(os.path.join(workdir, EVALUATION_FILE))
        report.write_json({"requests": ledger}, path)


def _disk_problems(workdir: str, step: int, forgotten: np.ndarray) -> tuple[bool, str]:
    """Whether anything in ``workdir`` still depends on a forgotten sample: a checkpoint step other than the current
    one, or a retrain-cache entry made before one of the deletions."""
    problems = []
    root = os.path.join(workdir, "checkpoints")
    others = sorted(int(d) for d in os.listdir(root) if d.isdigit() and int(d) != step)
    if others:
        problems.append(f"checkpoint steps {others} besides the current step {step}")
    cache = os.path.join(workdir, ORACLE_CACHE)
    for key in sorted(os.listdir(cache)) if os.path.isdir(cache) else []:
        try:
            with open(os.path.join(cache, key, "entry.json"), encoding="utf-8") as f:
                honoured = json.load(f)["meta"]["forgotten_ids"]
        except (OSError, ValueError, KeyError, TypeError):
            problems.append(f"retrain cache entry {key[:12]} does not say which deletions it honours")
            continue
        missing = np.setdiff1d(forgotten, honoured)
        if missing.size:
            problems.append(f"retrain cache entry {key[:12]} was trained with {missing.size} forgotten id(s)")
    return not problems, "; ".join(problems) or f"only step {step} on disk; every cached retrain honours every deletion"


@_locked
def evaluate_workdir(workdir: str, *, seed: int = 0) -> dict:
    """Judges the current state against a retrain on its retained data (cached under ``W/oracle_cache``), with the
    harness readouts (accuracies, distances, named membership attacks), and verifies the workdir; writes
    ``W/evaluation.json``.

    Raises:
      VerificationError: the verification failed (the report is written first, so the failed checks are named).
    """
    loaded = load(workdir)
    method, state, meta, step = loaded
    forgotten = method.forgotten_ids(state)
    sets = oracle.eval_sets(method.splits, forgotten)
    cache = oracle.OracleCache(os.path.join(workdir, ORACLE_CACHE))
    entry, info, _ = oracle.retrain_oracle(method, state, cache=cache, sets=sets, seed=seed)
    out = {"method": method.name, "step": step, "num_requests": len(meta.get("ledger", [])),
           "num_forgotten": int(forgotten.size), "oracle": {k: info[k] for k in ("key", "source")}
           | {"retrain_seconds": float(entry.train_seconds[0])}}
    if forgotten.size:
        out["readouts"] = experiment.readouts(method, state, entry, sets)
        logits = {name: np.asarray(method.predict(state, ds.x)) for name, ds in sets.items()}
        retrain = {name: entry.logits[name][0] for name in sets}
        inputs = {role: {name: mia.SplitLogits(lg[name], sets[name].y, sets[name].ids) for name in sets}
                  for role, lg in (("unlearned", logits), ("retrain", retrain))}
        attacks = []
        for name in ("lr_loss_cv", "svc_entropy", "lira_conf"):
            try:
                rec = mia.attack_all_models(mia.ATTACKS[name], inputs, seed=seed)
                attacks.extend(rec if isinstance(rec, list) else [rec])
            except mia.AttackInputError as e:  # too few forgotten samples for this attack: say so
                attacks.append({"attack": name, "skipped": str(e)})
        out["membership_attacks"] = attacks
    out["verification"] = verify(workdir, loaded=loaded)
    report.write_json(out, os.path.join(workdir, EVALUATION_FILE))
    status = "OK" if out["verification"]["ok"] else "FAILED"
    print(f"{method.name}: {len(meta.get('ledger', []))} request(s), {forgotten.size} ids forgotten; verification "
          f"{status}" + (f"; test accuracy {out['readouts']['test']['accuracy']:.4f} (retrain "
                         f"{out['readouts']['test']['oracle_accuracy']:.4f})" if forgotten.size else "")
          + f"; report {os.path.join(workdir, EVALUATION_FILE)}", flush=True)
    if not out["verification"]["ok"]:
        failed = [c for c in out["verification"]["checks"] if not c["ok"]]
        raise VerificationError(f"{workdir} failed verification: "
                                + "; ".join(f"{c['check']}: {c['detail']}" for c in failed))
    return out


__all__: Sequence[str] = ["RequestIdError", "VerificationError", "WorkdirError", "config_sha256", "evaluate_workdir",
                          "forget", "load", "params_sha256", "parse_ids", "read_model", "train", "verify"]
