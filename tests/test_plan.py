import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agpipe.jobs.plan import MAX_WINDOW, check_window, plan_windows


@st.composite
def window_and_crop(draw):
    window = draw(st.integers(1, MAX_WINDOW // 2048)) * 2048
    crop = draw(st.integers(0, (window // 2 - 1) // 128)) * 128
    return window, crop


@st.composite
def contigs_and_regions(draw):
    lengths = draw(st.lists(st.integers(1, 5_000_000), min_size=1, max_size=3))
    contigs = [(f"c{i}", length) for i, length in enumerate(lengths)]
    regions = {}
    for name, length in contigs:
        # An even number of distinct cut points pairs up into sorted, disjoint regions.
        cuts = sorted(draw(st.sets(st.integers(0, length), max_size=8)))
        if len(cuts) % 2:
            cuts = cuts[:-1]
        if cuts or draw(st.booleans()):
            regions[name] = list(zip(cuts[::2], cuts[1::2]))
    return contigs, regions


def as_arrays(windows):
    return {k: np.array([getattr(w, k) for w in windows], np.int64) for k in ("window_id", "start", "end", "out_start", "out_end")}


@settings(max_examples=60, deadline=None)
@given(window_and_crop(), contigs_and_regions())
def test_plan_tiles_every_contig(window_crop, contigs_regions):
    window, crop = window_crop
    contigs, regions = contigs_regions
    windows = list(plan_windows(contigs, window, crop))
    ids = np.array([w.window_id for w in windows])
    assert (np.diff(ids) > 0).all() and ids[0] == 0
    for name, length in contigs:
        mine = [w for w in windows if w.chrom == name]
        a = as_arrays(mine)
        # Kept spans are non-empty, abut and cover [0, length): every base is kept exactly once.
        assert a["out_start"][0] == 0 and a["out_end"][-1] == length
        assert (a["out_end"] > a["out_start"]).all()
        assert (a["out_start"][1:] == a["out_end"][:-1]).all()
        assert (a["end"] - a["start"] == window).all()
        # Each kept base has at least crop bases of input on both sides.
        assert (a["out_start"] - a["start"] >= crop).all() and (a["end"] - a["out_end"] >= crop).all()
        assert (a["out_start"] % 128 == 0).all()

    selected = list(plan_windows(contigs, window, crop, regions))
    expected = [
        w for w in windows if any(start < w.out_end and w.out_start < end for start, end in regions.get(w.chrom, ()))
    ]
    assert selected == expected  # same windows, same ids as the whole-genome plan


@pytest.mark.parametrize(
    "window, crop, words",
    [
        (1000, 0, "multiple of 2048"),
        (0, 0, "multiple of 2048"),
        (2 * MAX_WINDOW, 0, "maximum"),
        (131072, 100, "multiple of 128"),
        (131072, -128, "multiple of 128"),
        (131072, 65536, "leaves nothing"),
    ],
)
def test_check_window_errors(window, crop, words):
    with pytest.raises(ValueError, match=words) as e:
        check_window(window, crop)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError):
        list(plan_windows([("c", 10)], window, crop))


def test_check_window_accepts_limits():
    check_window(MAX_WINDOW, MAX_WINDOW // 2 - 128)
    check_window(2048, 0)
