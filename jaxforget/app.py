"""What every launcher shares: ``--config``/``--workdir`` flags, logging, the device list, then the library call.

A launcher is a few lines: it defines its flags with :func:`config_flag` / :func:`workdir_flag` and calls
:func:`main` with a function of the parsed flags; everything else lives in the library (testable, importable from
Colab).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxforget import errors


def config_flag(required: bool = True):
    """``--config=configs/<x>.py[:arg]`` (locked: a typo in ``--config.a.b=...`` is an error)."""
    flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/<x>.py[:arg]).", lock_config=True)
    if required:
        flags.mark_flags_as_required(["config"])
    return flag


def workdir_flag():
    """``--workdir``: where the job's state and reports live; a rerun with the same one resumes."""
    flag = flags.DEFINE_string("workdir", None, "Output directory; a rerun with the same one resumes.")
    flags.mark_flags_as_required(["workdir"])
    return flag


def main(fn: Callable[[], Any]) -> None:
    """Runs ``fn()`` under absl after parsing the flags; logs the devices; progress lines go to stdout."""

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress lines are printed
        logging.warning("jaxforget on %d %s device(s) (process %d of %d)", jax.device_count(),
                        jax.default_backend(), jax.process_index(), jax.process_count())
        try:
            fn()
        except errors.JaxForgetError as e:  # bad input: the message names the problem; nothing was changed
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    app.run(_main)


def run(job: Callable[[Any, str], Any]) -> None:
    """The launcher of a ``job(config, workdir)``: both flags required."""
    config, workdir = config_flag(), workdir_flag()
    main(lambda: job(config.value, workdir.value))
