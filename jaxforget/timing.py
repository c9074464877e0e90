"""Timing: wall time after device completion, medians after a warm-up, and compilations counted as they happen.

Every figure jaxforget reports is measured with these: :func:`timed` stops the clock only once every device result
is ready, :func:`median_time` compiles outside the timing, and :class:`CompileCounter` counts XLA compilations (and
their time) through ``jax.monitoring``, so a report can say that nothing recompiled between requests and how much
of a job's time was compilation, for any method, without reaching into a method's jitted functions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxforget import compat


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), wall seconds)``, waiting for every device result before the clock stops.

    Examples:
      >>> out, seconds = timed(lambda: 1 + 1)
      >>> out, seconds >= 0
      (2, True)
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn`` after one warm-up call (compilation excluded)."""
    jax.block_until_ready(fn())
    return statistics.median(timed(fn)[1] for _ in range(max(int(repeats), 1)))


class CompileCounter:
    """Counts XLA compilations, and their seconds, while it is active (a context manager; entering it again adds
    to the same totals).

    Eager operations on new shapes compile too, so a zero count after a warm-up means the timed code compiled
    nothing at all.

    Examples:
      >>> import jax.numpy as jnp
      >>> counter = CompileCounter()
      >>> with counter:
      ...     _ = jax.jit(lambda x: x * 3.0)(jnp.ones(7))
      >>> counter.count >= 1
      True
    """

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self._depth = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == compat.BACKEND_COMPILE_EVENT:
            self.count += 1
            self.seconds += float(duration)

    def __enter__(self) -> CompileCounter:
        if self._depth == 0:
            compat.add_duration_listener(self._listener)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            compat.remove_duration_listener(self._listener)
