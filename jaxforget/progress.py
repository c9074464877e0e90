"""Progress bars and ETAs for long jobs (tqdm on a terminal, absl logging lines otherwise)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from absl import logging
from tqdm.std import tqdm

T = TypeVar("T")


def enabled() -> bool:
    """Bars are off under pytest or when ``JAXFORGET_PROGRESS=0``."""
    if os.environ.get("JAXFORGET_PROGRESS", "1") == "0":
        return False
    return "pytest" not in sys.modules


def track(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Iterates over ``items`` with a progress bar (or nothing when disabled)."""
    if not enabled():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)


class Eta:
    """Logs ``done/total``, elapsed time and an ETA after each unit of work."""

    def __init__(self, total: int, what: str, done: int = 0):
        self.total, self.what, self.done = total, what, done
        self.start = time.perf_counter()
        self.start_done = done

    def step(self, extra: str = "") -> str:
        """Marks one unit done and logs the progress line, which is also returned."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        rate = elapsed / max(self.done - self.start_done, 1)
        eta = rate * (self.total - self.done)
        line = f"{self.what} {self.done}/{self.total}  elapsed {elapsed:.1f}s  ETA {eta:.1f}s  {extra}".rstrip()
        logging.info(line)
        if enabled():
            print(line, flush=True)
        return line
