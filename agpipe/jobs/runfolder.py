"""The run folder OUT as a whole: whether a run may write there, resuming, --overwrite, the lock.

Resume protocol. OUT/manifest.json records the run's identity (Job.identity) and weights sha256; a
rerun into OUT must match both, else it is refused before anything is written. Every file is
written under a temporary name and renamed when complete (agpipe.io.parquet), and windows.parquet
is rewritten atomically as the run goes, so after any crash the folder holds whole files only,
plus temporaries that the next run deletes. That run trusts a window only if windows.parquet says
`done` (or `skipped_all_n`) and every part it lists still has its recorded size and sha256;
everything else is computed again, replacing any part files of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agpipe.io.parquet import (
    MANIFEST_FILE,
    TRACKS_FILE,
    WINDOWS_FILE,
    WindowRecord,
    output_error,
    read_json,
    read_windows_table,
    remove_stale_temporaries,
    validate_part,
)
from agpipe.jobs.parity_report import PARITY_DIR
from agpipe.jobs.plan import Window

LOCK_FILE = ".agpipe.lock"
# Everything agpipe puts in OUT: --overwrite deletes these and nothing else.
OWNED_FILES = (MANIFEST_FILE, TRACKS_FILE, WINDOWS_FILE, LOCK_FILE)
OWNED_FOLDERS = ("predictions", "junctions", "contact_maps", PARITY_DIR)
VALIDATION_THREADS = 8  # sha256 of part files, in parallel (hashlib and pyarrow release the GIL)


class RunFolderError(ValueError):
    """OUT cannot take this run (one-line message saying what to do)."""


def check_run_folder(out: Path, identity: dict, weights_sha256: str, overwrite: bool) -> dict | None:
    """Before anything is written: the manifest of the run in OUT to resume, or None to start fresh.
    Refuses OUT if it is not a folder or holds another run (unless --overwrite)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    path = out / MANIFEST_FILE
    if overwrite or not path.exists():
        return None
    try:
        manifest = read_json(path)
        previous, previous_sha256 = manifest["identity"], manifest["weights"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RunFolderError(f"{path} is unreadable or not agpipe's: use --overwrite or another --out") from None
    for key, value in identity.items():
        if previous.get(key) != value:
            raise RunFolderError(
                f"{out} holds another run (its {key} is {describe(previous.get(key))}, this run's is "
                f"{describe(value)}): use --overwrite to replace it, or another --out"
            )
    if previous_sha256 != weights_sha256:
        raise RunFolderError(
            f"{out} was written with other weights (sha256 {previous_sha256[:12]}..., these are {weights_sha256[:12]}...): "
            "use the same weights to resume, --overwrite to replace the run, or another --out"
        )
    return manifest


def check_same_precision(out: Path, manifest: dict, precision: str) -> None:
    """The precision is part of a run's identity, known only once the device is (auto: by the cluster)."""
    if manifest["identity"].get("precision") != precision:
        raise RunFolderError(
            f"{out} holds a {manifest['identity'].get('precision')} run and this one would be {precision}: "
            "pass --precision to match it, --overwrite to replace it, or use another --out"
        )


def describe(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@contextlib.contextmanager
def locked_run_folder(out: Path, overwrite: bool) -> Iterator[None]:
    """Creates OUT and holds its lock while the run writes there; clears agpipe's files first with
    --overwrite, and always deletes temporaries a crashed run left behind (safe: we hold the lock)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a")  # noqa: SIM115 - held open for the block
    except OSError as e:  # read-only, not permitted, full: one line naming the path
        raise output_error(Path(e.filename or out), e) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"another agpipe run is writing to {out}: wait for it or use another --out") from None
        if overwrite:
            clear_run_folder(out)
        remove_stale_temporaries(out)
        yield


def clear_run_folder(out: Path) -> None:
    """Deletes the files agpipe owns in OUT (not the lock, which the caller holds)."""
    for name in OWNED_FILES:
        if name != LOCK_FILE:
            (out / name).unlink(missing_ok=True)
    for name in OWNED_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)


def clear_parity_check(out: Path) -> None:
    """Deletes OUT/parity/ (the manifest's parity field goes with the next manifest save): a run
    that computes windows again is checked again, and an older check must not pass for it."""
    shutil.rmtree(out / PARITY_DIR, ignore_errors=True)


def trusted_windows(out: Path, plan: Iterable[Window]) -> dict[int, WindowRecord]:
    """The windows of the plan that an earlier run in OUT finished and whose parts are intact."""
    if not (out / WINDOWS_FILE).exists():
        return {}
    try:
        previous = {r.window_id: r for r in read_windows_table(out)}
    except (OSError, ValueError):
        return {}  # an unreadable table trusts nothing: every window is computed again
    candidates = []
    for w in plan:
        r = previous.get(w.window_id)
        same = r is not None and (r.chrom, r.start, r.end, r.out_start, r.out_end) == (w.chrom, w.start, w.end, w.out_start, w.out_end)
        if same and r.status in ("done", "skipped_all_n"):
            candidates.append(r)
    with ThreadPoolExecutor(min(VALIDATION_THREADS, os.cpu_count() or 1)) as pool:
        intact = pool.map(lambda r: all(validate_part(out, p) for p in r.parts), candidates)
        return {r.window_id: r for r, ok in zip(candidates, intact) if ok}
