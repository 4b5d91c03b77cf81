"""What travels between a run's processes, and the reading side that makes it. Per window, the
object store carries:

    in   EncodedWindow      base codes, 1 byte per base (512 KiB for a 512 kb window)
    out  WindowPrediction   the kept rows of each output (kept bins x real tracks, bfloat16 as its
                            uint16 bits or float32), the kept square of the contact maps, and the
                            junctions between kept sites as a sparse list of (donor, acceptor,
                            counts per tissue)

No torch here: the reading and writing processes (GenomeReader, agpipe.jobs.writer.PredictionWriter)
import only this, so each starts in about a second instead of loading torch.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from agpipe.io.fasta import Genome, is_all_n, one_hot, open_genome
from agpipe.jobs.plan import Window
from agpipe.model.config import Output

# Base codes: 0 for no base, 1..4 for A, C, G, T (fasta.one_hot decides which bytes are bases); the
# worker maps them back to one-hot rows on the device with CODE_ONE_HOT. A table of every byte's
# code makes a read one lookup per base (0.5 ms a 512 kb window here, 4.3 ms through one_hot).
CODE_ONE_HOT = np.concatenate([np.zeros((1, 4), np.float32), np.eye(4, dtype=np.float32)])
CODE_OF_BYTE = (one_hot(bytes(range(256))) @ np.arange(1, 5, dtype=np.float32)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class SkippedWindow:
    """A window whose kept span is all N: it is not predicted."""

    window: Window
    seconds: float


@dataclasses.dataclass(frozen=True)
class EncodedWindow:
    window: Window
    codes: np.ndarray  # (window,) uint8 base codes (see CODE_OF_BYTE)
    seconds: float  # reading and encoding


def encode_window(genome: Genome, window: Window) -> EncodedWindow | SkippedWindow:
    """Reads a window's input span (N beyond the contig) as base codes, or skips it if all N."""
    started = time.perf_counter()
    sequence = genome.fetch(window.chrom, window.start, window.end)
    if is_all_n(sequence[window.out_start - window.start : window.out_end - window.start]):
        return SkippedWindow(window, time.perf_counter() - started)
    codes = np.take(CODE_OF_BYTE, np.frombuffer(sequence, np.uint8))
    return EncodedWindow(window, codes, time.perf_counter() - started)


@dataclasses.dataclass(frozen=True)
class JunctionPairs:
    """One strand's junctions between real sites in the kept span, in the contract's orientation."""

    donor: np.ndarray  # (N,) int: index into the strand's donor row of the positions
    acceptor: np.ndarray  # (N,) int: index into the strand's acceptor row
    counts: np.ndarray  # (N, tissues) float32


@dataclasses.dataclass(frozen=True)
class WindowPrediction:
    window: Window
    # Per-bin outputs, rows kept_rows(window, resolution): (rows, tracks), column-major, in the
    # model's output dtype; bfloat16 values travel as their uint16 bit patterns (half the bytes of
    # float32 through the host copy and the object store). `values` widens them exactly.
    tracks: dict[Output, np.ndarray]
    contact_maps: np.ndarray | None  # (P, P, tracks): the bins kept_rows(window, 2048) on both axes
    junction_positions: np.ndarray | None  # (4, K) sites, bases from the window start, -1 for none
    junction_pairs: tuple[JunctionPairs, JunctionPairs] | None  # + strand, - strand
    nonfinite_count: int  # NaN or infinite values in what will be written
    compute_seconds: float = 0.0  # the window's share of its batch's model time (forward, crop, copy)
    seconds: float = 0.0  # reading + compute_seconds

    def values(self, output: Output) -> np.ndarray:
        """An output's kept rows as float32 (rows, tracks), column-major."""
        values = self.tracks[output]
        if values.dtype == np.uint16:  # bfloat16 bits: the high half of a float32 (one pass)
            return np.left_shift(values, 16, dtype=np.uint32).view(np.float32)
        return values.astype(np.float32, copy=False)


class GenomeReader:
    """A process of the driver's node that reads windows as base codes for the model workers."""

    def __init__(self, genome_path: str):
        self.genome = open_genome(genome_path)

    def read(self, window: Window) -> EncodedWindow | SkippedWindow:
        return encode_window(self.genome, window)
