"""AGPIPE_HOME's bytecode cache: where the environment forbids bytecode beside the sources, agpipe's
processes keep it in AGPIPE_HOME/pycache, so a second process does not compile torch again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CROP, WINDOW

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import os, sys
from agpipe.home import keep_bytecode
keep_bytecode()
sys.path.insert(0, sys.argv[1])
import probe_module
print(os.environ.get("PYTHONPYCACHEPREFIX"), repr(os.environ.get("PYTHONDONTWRITEBYTECODE")))
"""


def python(tmp_path: Path, code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env={**base, "AGPIPE_HOME": str(tmp_path / "home"), **env},
                          capture_output=True, text=True, cwd=REPO, check=True)


@pytest.fixture()
def sources(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "probe_module.py").write_text("VALUE = 1\n")
    return folder


def compiled(folder: Path) -> list[Path]:
    return list(folder.rglob("probe_module*.pyc"))


def test_forbidden_bytecode_goes_to_agpipe_home_and_the_sources_stay_untouched(tmp_path, sources):
    result = python(tmp_path, PROBE, sources, PYTHONDONTWRITEBYTECODE="1")
    assert result.stdout.split() == [str(tmp_path / "home" / "pycache"), "''"]  # what Ray's processes inherit
    assert compiled(tmp_path / "home" / "pycache") and not compiled(sources)


def test_a_prefix_the_user_chose_is_kept(tmp_path, sources):
    mine = tmp_path / "mine"
    result = python(tmp_path, PROBE, sources, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(mine))
    assert result.stdout.split() == [str(mine), "'1'"]
    assert not (tmp_path / "home").exists() and not compiled(sources)


def test_where_bytecode_is_allowed_nothing_changes(tmp_path, sources):
    result = python(tmp_path, PROBE, sources)
    assert result.stdout.split() == ["None", "None"]
    assert compiled(sources) and not (tmp_path / "home").exists()


def test_the_command_line_keeps_the_bytecode_of_what_it_imports(tmp_path, small_genome):
    python(tmp_path, "import sys; sys.argv[0] = 'agpipe'; from agpipe.__main__ import main; main()", "run", small_genome, "--model", "demo",
           "--window", WINDOW, "--crop", CROP, "--dry-run", PYTHONDONTWRITEBYTECODE="1")
    kept = {p.name.split(".")[0] for p in (tmp_path / "home" / "pycache").rglob("*.pyc")}
    assert {"cli", "plan", "options", "run", "estimate"} <= kept
