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


COMPILE_PROBE = """
import os, torch
from agpipe.home import keep_compile_cache
keep_compile_cache()
torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.randn(64))
print(os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"])
"""


def test_the_compiled_model_is_kept_in_agpipe_home(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    result = subprocess.run([sys.executable, "-c", COMPILE_PROBE], env={**base, "AGPIPE_HOME": str(tmp_path / "home")},
                            capture_output=True, text=True, cwd=REPO, check=True)
    cache = tmp_path / "home" / "compile-cache"
    assert result.stdout.split() == [str(cache / "inductor"), str(cache / "triton")]
    assert any(p.is_file() for p in (cache / "inductor").rglob("*"))  # what a second worker reads instead of compiling


def test_a_compile_cache_the_user_chose_is_kept(tmp_path):
    mine = tmp_path / "mine"
    result = subprocess.run([sys.executable, "-c", COMPILE_PROBE], env={**os.environ, "AGPIPE_HOME": str(tmp_path / "home"),
                            "TORCHINDUCTOR_CACHE_DIR": str(mine / "inductor"), "TRITON_CACHE_DIR": str(mine / "triton")},
                            capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.split() == [str(mine / "inductor"), str(mine / "triton")]
    assert any(p.is_file() for p in (mine / "inductor").rglob("*")) and not (tmp_path / "home" / "compile-cache").exists()
