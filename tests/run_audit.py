"""Auditing a run folder after a fault: what the reliability tests check and count.

`audit(out, options)` compares OUT with the plan of the run's options and returns counts of
everything that can go wrong (windows lost or written twice, duplicate or missing bins, invalid or
orphan part files, temporaries left, a wrong manifest); `assert_clean` asserts they are all zero.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from agpipe.io.parquet import MANIFEST_FILE, STATUSES, TEMP_NAME, kept_rows, read_json, read_windows_table, validate_part
from agpipe.jobs.options import RunOptions, prepare_job

FINISHED = ("done", "skipped_all_n")


@dataclasses.dataclass
class Audit:
    planned: int = 0
    windows_lost: int = 0  # planned windows not finished, or finished with a part that is not intact
    windows_duplicated: int = 0  # windows some of whose bins were written more than once
    rows_duplicated: int = 0  # rows beyond the first with the same (chrom, start) in an output
    bins_missing: int = 0  # bins of finished windows' kept spans that no row holds
    rows_outside: int = 0  # rows outside every done window's kept span
    orphan_parts: int = 0  # part files that windows.parquet does not list
    invalid_files: int = 0  # files in OUT that do not read back (Parquet or JSON)
    temporaries: int = 0
    manifest_problems: list[str] = dataclasses.field(default_factory=list)

    def problems(self) -> dict:
        found = {k: v for k, v in dataclasses.asdict(self).items() if k != "planned" and v}
        return found


def audit(out: Path, options: RunOptions, expect_status: str = "complete") -> Audit:
    job = prepare_job(options)
    plan = {w.window_id: w for w in job.windows()}
    result = Audit(planned=len(plan))
    records = {r.window_id: r for r in read_windows_table(out)}
    finished = {i for i, r in records.items() if r.status in FINISHED and all(validate_part(out, p) for p in r.parts)}
    result.windows_lost = len(set(plan) - finished)

    manifest = read_json(out / MANIFEST_FILE)
    counts = Counter(r.status for r in records.values())
    if manifest.get("status") != expect_status:
        result.manifest_problems.append(f"status {manifest.get('status')!r}, expected {expect_status!r}")
    if manifest.get("windows") != {s: counts[s] for s in STATUSES}:
        result.manifest_problems.append(f"windows {manifest.get('windows')} but windows.parquet has {dict(counts)}")
    if manifest.get("plan", {}).get("windows") != len(plan) or set(records) != set(plan):
        result.manifest_problems.append("the plan in the manifest or windows.parquet is not the job's plan")

    listed = {p.path for r in records.values() for p in r.parts}
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        if TEMP_NAME.match(path.name):
            result.temporaries += 1
            continue
        relative = path.relative_to(out).as_posix()
        try:
            if path.suffix == ".parquet":
                pq.read_metadata(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception:  # noqa: BLE001 - any unreadable file counts
            result.invalid_files += 1
        if path.suffix == ".parquet" and relative.split("/")[0] in ("predictions", "junctions", "contact_maps") and relative not in listed:
            result.orphan_parts += 1

    # Every bin of each done window's kept span exactly once, per output, over all part files.
    done = [plan[i] for i in finished if records[i].status == "done"]
    for output in job.outputs:
        folder = out / "predictions" / f"head={output.head}" / f"resolution={output.resolution}"
        seen: Counter = Counter()
        for part in folder.rglob("*.parquet") if folder.exists() else ():
            if TEMP_NAME.match(part.name):
                continue
            try:
                table = pq.read_table(part, columns=["chrom", "start"])
            except Exception:  # noqa: BLE001 - counted in invalid_files
                continue
            seen.update(zip(table["chrom"].to_pylist(), table["start"].to_pylist()))
        expected = {}
        for w in done:
            for row in kept_rows(w, output.resolution):
                expected[(w.chrom, w.start + row * output.resolution)] = w.window_id
        result.rows_duplicated += sum(n - 1 for n in seen.values() if n > 1)
        result.bins_missing += sum(1 for key in expected if key not in seen)
        result.rows_outside += sum(n for key, n in seen.items() if key not in expected)
        doubled = {expected[key] for key, n in seen.items() if n > 1 and key in expected}
        result.windows_duplicated = max(result.windows_duplicated, len(doubled))
    return result


def assert_clean(result: Audit) -> None:
    assert not result.problems(), result.problems()
