"""The window plan: the one place that decides which windows a run predicts and which bases each keeps.

A window of `window` bases keeps its middle, dropping `crop` bases of output on each side. Windows
step by `window - 2 * crop` and the first starts `crop` bases before the contig, so the kept spans
tile every contig exactly: each base lies in exactly one window's kept span, and every kept base has
`crop` bases of context on each side (N beyond the contig ends).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence

DEFAULT_WINDOW = 524_288
MAX_WINDOW = 1_048_576
WINDOW_MULTIPLE = 2048  # the pair map is window / 2048 bins per side
CROP_MULTIPLE = 128  # kept spans start on the 128 bp grid of the contig


@dataclasses.dataclass(frozen=True)
class Window:
    window_id: int
    chrom: str
    start: int  # input span [start, end) in contig coordinates; may reach past either end (N-padded)
    end: int
    out_start: int  # kept span [out_start, out_end), inside the contig
    out_end: int

    @property
    def kept(self) -> int:
        return self.out_end - self.out_start


def default_crop(window: int) -> int:
    return window // 8


def check_window(window: int, crop: int) -> None:
    """Raises ValueError with a one-line, actionable message for an impossible window or crop."""
    if window <= 0 or window % WINDOW_MULTIPLE:
        raise ValueError(f"--window {window} is not a positive multiple of {WINDOW_MULTIPLE}: try {max(WINDOW_MULTIPLE, window // WINDOW_MULTIPLE * WINDOW_MULTIPLE)}")
    if window > MAX_WINDOW:
        raise ValueError(f"--window {window} is larger than the model's maximum {MAX_WINDOW}: use {MAX_WINDOW} or less")
    if crop < 0 or crop % CROP_MULTIPLE:
        raise ValueError(f"--crop {crop} is not a non-negative multiple of {CROP_MULTIPLE}")
    if 2 * crop >= window:
        raise ValueError(f"--crop {crop} leaves nothing of a {window} bp window: use less than {window // 2}")


def contig_windows(chrom: str, length: int, window: int, crop: int, first_id: int = 0) -> Iterator[Window]:
    """The windows whose kept spans tile [0, length) of one contig."""
    step = window - 2 * crop
    for i, out_start in enumerate(range(0, length, step)):
        start = out_start - crop
        yield Window(first_id + i, chrom, start, start + window, out_start, min(out_start + step, length))


def windows_per_contig(length: int, window: int, crop: int) -> int:
    step = window - 2 * crop
    return -(-length // step)


def overlaps(window: Window, regions: Sequence[tuple[int, int]]) -> bool:
    """Whether the kept span meets any of the (sorted, merged) half-open regions."""
    lo, hi = 0, len(regions)
    while lo < hi:  # first region ending after out_start
        mid = (lo + hi) // 2
        if regions[mid][1] <= window.out_start:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(regions) and regions[lo][0] < window.out_end


def plan_windows(
    contigs: Iterable[tuple[str, int]],
    window: int,
    crop: int,
    regions: Mapping[str, Sequence[tuple[int, int]]] | None = None,
) -> Iterator[Window]:
    """Every window of the run, in contig order. Window ids are stable: they number all windows of
    the contigs given, so a region filter keeps the ids the whole-genome plan would give."""
    check_window(window, crop)
    next_id = 0
    for chrom, length in contigs:
        for w in contig_windows(chrom, length, window, crop, next_id):
            if regions is None or overlaps(w, regions.get(chrom, ())):
                yield w
        next_id += windows_per_contig(length, window, crop)
