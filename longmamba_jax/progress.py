"""A tqdm progress bar, or a stand-in that does nothing when progress is off."""

from __future__ import annotations

from collections.abc import Iterable


class NoBar:
    """The parts of a tqdm bar that callers use, doing nothing."""

    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **tqdm_kwargs):
    """`tqdm(iterable, **tqdm_kwargs)`; when not `enabled`, `iterable` itself (or a `NoBar`)."""
    if not enabled:
        return iterable if iterable is not None else NoBar()
    from tqdm.auto import tqdm

    return tqdm(iterable, **tqdm_kwargs)
