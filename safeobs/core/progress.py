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


def progress_bar(enabled: bool | None, label: str, total: int | None = None) -> _Bar:
    """A bar labelled ``label`` over ``total`` steps: ``.step(what)`` after each, ``.close()`` at the end."""
    return _Bar(enabled, label, total)
