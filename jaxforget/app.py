"""The one entry point every launcher shares: ``--config``/``--workdir`` flags, logging, then ``run(config, workdir)``.

A launcher is ``app.run(library.run)``; everything else lives in the library (testable, importable from Colab).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags


def run(job: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
    """Defines the launcher flags and runs ``job(config, workdir)`` under absl."""
    config = config_flags.DEFINE_config_file("config", None, "Config file (configs/<x>.py[:arg]).", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Output directory; a rerun with the same one resumes.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress lines are printed
        job(config.value, workdir.value)

    app.run(main)
