"""Progress bars on stderr: ``tqdm``, shown only when asked (``True``) or, by default, on a terminal."""

from __future__ import annotations

import sys


class _Bar:
    """A ``tqdm`` bar with the two calls safeobs needs; a no-op when disabled."""

    def __init__(self, enabled: bool | None, label: str, total: int | None = None):
        on = sys.stderr.isatty() if enabled is None else bool(enabled)
        self._bar = None
        if on:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, file=sys.stderr, leave=True, dynamic_ncols=True)

    def step(self, what: str = "") -> None:
        if self._bar is not None:
            if what:
                self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


LARGE = 50_000_000  # weights: below this, progress=None means no bar even on a terminal (runs take seconds)


def auto(enabled: bool | None, weights: int) -> bool | None:
    """``enabled``, or when None: a bar on a terminal (None) for a model of at least :data:`LARGE` weights,
    none (False) for a smaller one."""
    if enabled is not None:
        return bool(enabled)
    return None if weights >= LARGE else False


def progress_bar(enabled: bool | None, label: str, total: int | None = None) -> _Bar:
    """A bar labelled ``label`` over ``total`` steps: ``.step(what)`` after each, ``.close()`` at the end."""
    return _Bar(enabled, label, total)


def rss_mb() -> float:
    """This process's resident memory in MB (``VmRSS``; 0 where ``/proc`` is missing): for progress labels."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
