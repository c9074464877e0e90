"""Job configs: every field of the forget job and of the comparison defined once, with one validation function each.

A config file (``configs/<method>_<data>.py``) starts from these defaults and overrides fields; a field that is not
defined here (or in :func:`jaxforget.data.default_config` and the method's ``default_config``) is an error, so a typo
on the command line (``--config.method.sigam=...``) fails with the valid names instead of being ignored.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from jaxforget import data as data_lib
from jaxforget import errors
from jaxforget.methods import base, get_method


def runtime_fields(config: ml_collections.ConfigDict) -> None:
    """Adds the runtime section shared by every job: ``seed``, ``num_devices`` (0: all devices)."""
    config.seed = 0
    config.num_devices = 0


#: Values of a forget job's ``requests.select``.
SELECTIONS = ("random", "class")


def requests_section() -> ml_collections.ConfigDict:
    """The forget job's ``requests`` section, with its defaults.

    Requests are sequential and disjoint, drawn with ``seed`` from the ids the method may forget (its forgettable
    ids). ``select="random"``: each a random draw of ``size`` ids, or (``size`` 0, the default) of
    ``round(fraction · forgettable)`` ids. ``select="class"`` (whole-class erasure): each every forgettable id of one
    class, of ``classes`` (one label per request) or, with ``classes`` empty, of ``num_requests`` distinct classes
    drawn with ``seed``; ``size`` must be 0 then. ``fraction`` is not read once ``size`` or a class selects the ids.
    ``noise_seed``: -1 draws each request's noise key from the OS, secret and unrecorded; >= 0 makes request k's key
    ``fold_in(key(noise_seed), k)``, so that two runs are bit-identical (noise included).
    """
    return ml_collections.ConfigDict(dict(num_requests=10, fraction=0.01, size=0, select="random", classes=(),
                                          seed=0, noise_seed=-1))


def forget_job(method: str, model: dict) -> ml_collections.ConfigDict:
    """The forget job's config for ``method`` (its default method config) on the default data."""
    c = ml_collections.ConfigDict()
    c.data = data_lib.default_config()
    c.model = ml_collections.ConfigDict(model)
    c.method = get_method(method).default_config()
    c.requests = requests_section()
    # Evaluation: the method's timed baselines besides its retrain; the oracle cache ("": <workdir>/oracle_cache).
    c.eval = ml_collections.ConfigDict(dict(baselines=(), oracle_cache=""))
    runtime_fields(c)
    c.checkpoint_max_to_keep = 2
    # The workflow's budget on the summed residuals (ForgetInfo.residual) of the requests since the last exact
    # retrain: past it launch.forget warns (or retrains exactly with --retrain_when_over_budget). A method that
    # reports no residual exhausts it at once.
    c.residual_budget = 0.01
    return c


def _check_sections(config, want: tuple[str, ...], where: str) -> None:
    have = set(config.keys())
    if have - set(want):
        raise errors.ConfigError(f"{where}: unknown config field(s) {sorted(have - set(want))}; valid: {list(want)}.")
    if set(want) - have:
        raise errors.ConfigError(f"{where}: missing config field(s) {sorted(set(want) - have)}.")


def validate_forget_job(config: ml_collections.ConfigDict) -> None:
    """Checks a forget job's config (sections, types, ranges); the method and data sections by their own validators.

    Raises:
      ConfigError: naming the first invalid or unknown field. KeyError: an unknown method (the valid ones listed).
    """
    _check_sections(config, ("data", "model", "method", "requests", "eval", "seed", "num_devices",
                             "checkpoint_max_to_keep", "residual_budget"), "forget job")
    data_lib.validate_config(config.data)
    get_method(config.method.name).validate_config(config.method)
    base.validate_fields(config.requests, requests_section(), "requests")
    base.check_range(config.requests.num_requests, "requests.num_requests", low=1)
    base.check_range(config.requests.fraction, "requests.fraction", low=0, high=1, low_open=True)
    base.check_range(config.requests.seed, "requests.seed", low=0)
    validate_selection(config.requests)
    if isinstance(config.requests.noise_seed, bool) or not isinstance(config.requests.noise_seed, int) \
            or config.requests.noise_seed < -1:
        raise errors.ConfigError(f"requests.noise_seed must be an integer >= -1 (-1: secret noise), got "
                                 f"{config.requests.noise_seed!r}.")
    base.validate_fields(config.eval, ml_collections.ConfigDict(dict(baselines=(), oracle_cache="")), "eval")
    _check_runtime(config)
    base.check_range(config.checkpoint_max_to_keep, "checkpoint_max_to_keep", low=1)
    base.check_range(config.residual_budget, "residual_budget", low=0)


def _check_int(value, what: str, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise errors.ConfigError(f"{what} must be an integer >= {low}, got {value!r}.")


def validate_selection(requests: ml_collections.ConfigDict) -> None:
    """Checks the request selection of a forget job's ``requests`` section, as far as it can be known without the
    data: ``size`` an integer >= 0; ``select`` "random" or "class"; ``classes`` only with ``select="class"``, then
    one distinct label >= 0 per request; no ``size`` with ``select="class"`` (the request is the whole class).

    Whether the ids suffice (``size`` × ``num_requests`` forgettable ids, a label of the data with forgettable ids)
    is checked when the plan is drawn (:func:`jaxforget.experiment.plan_requests`), before any training.

    Raises:
      ConfigError: naming the field (``requests.size``, ``requests.select`` or ``requests.classes``).
    """
    _check_int(requests.size, "requests.size", low=0)
    base.check_choice(requests.select, SELECTIONS, "requests.select")
    classes = tuple(requests.classes)
    if requests.select != "class":
        if classes:
            raise errors.ConfigError(f"requests.classes {classes!r} is read only with requests.select='class' (got "
                                     f"{requests.select!r}); leave it empty, or select whole classes.")
        return
    if requests.size != 0:
        raise errors.ConfigError(f"requests.size must be 0 with requests.select='class' (a request is every "
                                 f"forgettable id of its class), got {requests.size!r}.")
    for label in classes:
        _check_int(label, "requests.classes: each class label", low=0)
    if classes and len(classes) != requests.num_requests:
        raise errors.ConfigError(f"requests.classes names {len(classes)} class(es) for requests.num_requests = "
                                 f"{requests.num_requests}: one class per request, or empty to draw them.")
    if len(set(classes)) != len(classes):
        raise errors.ConfigError(f"requests.classes {classes!r} names a class twice; requests are disjoint, so "
                                 "each class can be erased once.")


def _check_runtime(config) -> None:
    for field in ("seed", "num_devices"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise errors.ConfigError(f"{field} must be an integer >= 0, got {value!r}.")


def compare_job() -> ml_collections.ConfigDict:
    """The comparison's config with no methods yet (``methods.<label> = method_entry(...)`` adds one)."""
    c = ml_collections.ConfigDict()
    c.data = data_lib.default_config()
    c.methods = ml_collections.ConfigDict(sort_keys=False)  # the report lists methods in this order
    c.seeds = (0, 1, 2)  # each fixes initialisations and data orders, the request draw and noise keys
    # The request D_f, drawn per seed from the ids every method may forget (their common forgettable ids):
    # forget_class >= 0: all of them of that class (whole-class erasure; forget_size must be 0); else forget_size > 0
    # of them at random; else (the default) round(forget_fraction · common) at random. forget_fraction is not read
    # once forget_size or forget_class selects. The warm-up request is disjoint and of the same size (for a class: from
    # the other classes). The report records the selection under data.selection.
    c.forget_fraction = 0.15
    c.forget_size = 0
    c.forget_class = -1
    c.eval = ml_collections.ConfigDict(dict(
        n_models=64,  # per population (the challenge's N); 2N retrains are cached
        # "per_model": N independent originals, each unlearned once, vs 2N independent retrains (the spread of
        # training itself); "single": the challenge's one original, the spread is the method's own randomness.
        originals="per_model",
        oracle_cache="",  # "": <workdir>/oracle_cache
        relearn=ml_collections.ConfigDict(dict(mode="forget_plus_retain", size=500, batch_size=128,
                                               learning_rate=0.01, momentum=0.9, max_epochs=30)),
    ))
    c.num_devices = 0
    return c


def method_entry(method: str, model: dict, baselines: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """One entry of a comparison: a model, a method config (its defaults, to override) and its timed baselines."""
    return ml_collections.ConfigDict(dict(model=ml_collections.ConfigDict(model),
                                          method=get_method(method).default_config(), baselines=tuple(baselines)))


def validate_compare(config: ml_collections.ConfigDict) -> None:
    """Checks a comparison's config, every method entry by its method's validator.

    Raises:
      ConfigError: naming the first invalid or unknown field. KeyError: an unknown method name.
    """
    _check_sections(config, ("data", "methods", "seeds", "forget_fraction", "forget_size", "forget_class", "eval",
                             "num_devices"), "compare")
    data_lib.validate_config(config.data)
    if not config.methods:
        raise errors.ConfigError("compare: config.methods is empty; add at least one method entry.")
    for label, entry in config.methods.items():
        _check_sections(entry, ("model", "method", "baselines"), f"compare: methods.{label}")
        get_method(entry.method.name).validate_config(entry.method)
    if not config.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
        raise errors.ConfigError(f"compare: seeds must be a non-empty tuple of integers >= 0, got {config.seeds!r}.")
    base.check_range(config.forget_fraction, "compare: forget_fraction", low=0, high=0.5, low_open=True)
    _check_int(config.forget_size, "compare: forget_size", low=0)
    _check_int(config.forget_class, "compare: forget_class", low=-1)
    if config.forget_class >= 0 and config.forget_size != 0:
        raise errors.ConfigError(f"compare: forget_size must be 0 with forget_class = {config.forget_class} (the "
                                 f"request is every common forgettable id of the class), got {config.forget_size!r}.")
    base.validate_fields(config.eval, compare_job().eval, "compare: eval")
    base.check_range(config.eval.n_models, "compare: eval.n_models", low=2)
    base.check_choice(config.eval.originals, ("single", "per_model"), "compare: eval.originals")
    rc = config.eval.relearn
    base.check_choice(rc.mode, ("resample", "forget_plus_retain"), "compare: eval.relearn.mode")
    for field in ("size", "batch_size", "max_epochs"):
        base.check_range(rc[field], f"compare: eval.relearn.{field}", low=1)
    _check_runtime(ml_collections.ConfigDict(dict(seed=0, num_devices=config.num_devices)))


def _flatten(obj, prefix: str = "") -> dict:
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: list(obj) if isinstance(obj, tuple) else obj}


def config_diff(old, new, *, limit: int = 8) -> list[str]:
    """``"field: old → new"`` for every field two configs (or their dict/JSON forms) disagree on, sorted, at most
    ``limit`` (then a count of the rest).

    Examples:
      >>> config_diff({"method": {"sigma": 1e-4, "mu": 1.0}}, {"method": {"sigma": 2e-4, "mu": 1.0}})
      ['method.sigma: 0.0001 → 0.0002']
    """
    a, b = _flatten(old), _flatten(new)

    def show(d: dict, key: str) -> str:
        return repr(d[key]) if key in d else "(absent)"

    lines = [f"{k}: {show(a, k)} → {show(b, k)}" for k in sorted(set(a) | set(b))
             if k not in a or k not in b or a[k] != b[k]]
    return lines[:limit] + ([f"… and {len(lines) - limit} more"] if len(lines) > limit else [])
