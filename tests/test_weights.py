"""Where weights come from (agpipe/model/weights.py and the CLI): `agpipe convert`, config
detection, track metadata, `agpipe weights download`, finding weights by name, the demo model.

Every test has its own AGPIPE_HOME and no network: urlopen and snapshot_download fail unless a
test replaces them, and HF_TOKEN is a marker that must never show up in any output or file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import subprocess
import sys
import types
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from huggingface_hub import errors as hf_errors

from agpipe.cli import main
from agpipe.model import weights as weights_module
from agpipe.model.alphagenome import AlphaGenome
from agpipe.model.checkpoint import (
    file_sha256,
    flatten_tree,
    load_weights,
    official_spec,
    ours_to_official,
    random_official_tree,
    unflatten_tree,
    write_orbax,
)
from agpipe.model.config import ALL_OUTPUTS, DEFAULT_OUTPUTS, HEADS, OFFICIAL, ORGANISMS, SMALL
from agpipe.model.metadata import FIELDS, FILES, OUTPUT_TYPES, Track, TrackMetadata, load_metadata, synthetic_metadata
from agpipe.model.precision import BFLOAT16, FLOAT32
from agpipe.model.weights import (
    METADATA_SHA256,
    WeightsError,
    demo_weights,
    detect_config,
    load_model,
    official_metadata_dir,
    resolve_weights,
    weights_dir,
)

ROOT = Path(__file__).parent.parent
TREE_FILE = Path(__file__).parent / "data" / "official_param_tree.txt"
REFERENCE_METADATA = Path(os.environ.get("AGPIPE_REFERENCE_METADATA", "/work/shared/reference/metadata"))
TOKEN = "secret-token-123"
REPO = "google/alphagenome-all-folds"
SEED = 3


def no_network(*args, **kwargs):
    raise AssertionError("a test reached for the network")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh AGPIPE_HOME, the marker token, and no network, for every test."""
    home = tmp_path / "agpipe-home"
    monkeypatch.setenv("AGPIPE_HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    return home


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """An Orbax checkpoint of random_official_tree(SMALL, SEED), saved as the official ones are. Read only."""
    path = tmp_path_factory.mktemp("small") / "checkpoint"
    write_orbax(path, *random_official_tree(SMALL, SEED))
    return path


def agpipe(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_fails_in_one_line(result: Result, message: str) -> None:
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"agpipe: error: {message}\n"



def assert_bit_identical(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    fa, fb = flatten_tree(*a), flatten_tree(*b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes()), path


def same_tracks(a: TrackMetadata, b: TrackMetadata) -> bool:
    """Field-by-field equality, NaN equal to NaN."""
    for organism in ORGANISMS:
        for head in HEADS:
            x, y = a.tracks(organism, head), b.tracks(organism, head)
            if len(x) != len(y):
                return False
            for s, t in zip(x, y):
                for f in FIELDS:
                    u, v = getattr(s, f), getattr(t, f)
                    if not ((u == v and type(u) is type(v)) or (f == "nonzero_mean" and math.isnan(u) and math.isnan(v))):
                        return False
    return True


# ---- official textproto metadata, written by the test ----------------------------------------------

STRANDS = {"+": "STRAND_POSITIVE", "-": "STRAND_NEGATIVE", ".": "STRAND_UNSTRANDED"}
OUTPUT_TYPE_OF = {head: output_type for output_type, head in OUTPUT_TYPES.items()}


def quote(text: str) -> str:
    """A string as protobuf's text_format writes it: C escapes, non-ASCII as octal UTF-8 bytes."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in "\"'\\":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def track_lines(t: Track, junction: bool) -> list[str]:
    lines = [f"name: {quote(t.name)}"]
    if not junction:
        lines.append(f"strand: {STRANDS[t.strand]}")
    if t.ontology_curie:
        kind, _, ident = t.ontology_curie.partition(":")
        lines += ["ontology_term {", f"  ontology_type: ONTOLOGY_TYPE_{kind}", f"  id: {int(ident)}", "}"]
    if t.biosample_type:
        lines += ["biosample {", f"  type: BIOSAMPLE_TYPE_{t.biosample_type.upper()}"]
        lines += [f"  {k}: {quote(v)}" for k, v in (("name", t.biosample_name), ("stage", t.biosample_stage)) if v]
        lines.append("}")
    text = {"assay": t.assay, "gtex_tissue": t.gtex_tissue, "data_source": t.data_source}
    if not junction:
        text |= {"transcription_factor_code": t.transcription_factor, "histone_mark_code": t.histone_mark}
    lines += [f"{k}: {quote(v)}" for k, v in text.items() if v]
    if not junction:
        if t.endedness:
            lines.append(f"endedness: ENDEDNESS_{t.endedness.upper()}")
        if t.genetically_modified is not None:
            lines.append(f"genetically_modified: {str(t.genetically_modified).lower()}")
        if not math.isnan(t.nonzero_mean):
            lines.append(f"nonzero_mean: {np.float32(t.nonzero_mean)!s}")  # shortest float32 digits
    return lines


def write_textproto(meta: TrackMetadata, directory: Path) -> Path:
    """Both organisms' OutputMetadataResponse files, in the official layout."""
    directory.mkdir(parents=True, exist_ok=True)
    for organism, file_name in FILES.items():
        out = []
        for head in HEADS:
            junction = HEADS[head].kind == "splice_junction"
            out += ["output_metadata {", f"  output_type: {OUTPUT_TYPE_OF[head]}", f"  {'junctions' if junction else 'tracks'} {{"]
            for t in meta.tracks(organism, head):
                out += ["    metadata {", *(f"      {line}" for line in track_lines(t, junction)), "    }"]
            out += ["  }", "}"]
        (directory / file_name).write_text("\n".join(out) + "\n")
    return directory


def official_like_metadata(cfg) -> TrackMetadata:
    """Synthetic metadata with ontologies the official files know, and names that need escaping."""
    base = synthetic_metadata(cfg)
    tracks = {
        o: {h: [dataclasses.replace(t, name=t.name.replace("DEMO:", "UBERON:"), ontology_curie=t.ontology_curie.replace("DEMO:", "UBERON:")) for t in base.tracks(o, h)] for h in HEADS}
        for o in ORGANISMS
    }
    atac = tracks["human"]["atac"]
    atac[0] = dataclasses.replace(atac[0], name='ATAC "quoted" back\\slash\nnew line', biosample_name="stem cell of Wharton's jelly")
    atac[1] = dataclasses.replace(atac[1], biosample_name="Müller glia – café", genetically_modified=True, biosample_stage="")
    junction = tracks["human"]["splice_sites_junction"]
    junction[0] = dataclasses.replace(junction[0], gtex_tissue="Brain - Frontal Cortex (BA9)", ontology_curie="CL:0000047")
    return TrackMetadata(tracks)


# ---- agpipe convert ----------------------------------------------------------------------------------


def test_convert_round_trip_is_bit_exact(small_checkpoint, tmp_path):
    out = tmp_path / "small.safetensors"
    result = agpipe("convert", small_checkpoint, "-o", out)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == f"wrote {out} (128-channel AlphaGenome, sha256 {file_sha256(out)[:16]}...)\n"
    weights = load_weights(out)
    assert weights.cfg == SMALL
    assert_bit_identical(ours_to_official(weights.tensors, weights.cfg), random_official_tree(SMALL, SEED))
    assert weights.metadata_json == synthetic_metadata(SMALL).to_json()  # the default for a non-official size
    assert os.listdir(tmp_path) == ["small.safetensors"]


def test_convert_is_reproducible(small_checkpoint, tmp_path):
    for name in ("a", "b"):
        assert agpipe("convert", small_checkpoint, "-o", tmp_path / f"{name}.safetensors").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_convert_with_official_textproto_metadata(small_checkpoint, tmp_path):
    meta = official_like_metadata(SMALL)
    write_textproto(meta, tmp_path / "metadata")
    assert same_tracks(load_metadata(tmp_path / "metadata"), meta)
    result = agpipe("convert", small_checkpoint, "-o", tmp_path / "w.safetensors", "--metadata", tmp_path / "metadata")
    assert result.exit_code == 0, result.stderr
    stored = TrackMetadata.from_json(load_weights(tmp_path / "w.safetensors").metadata_json)
    assert same_tracks(stored, meta)
    assert stored.to_json() == meta.to_json()
    assert stored.tracks("human", "atac")[1].biosample_name == "Müller glia – café"


def test_convert_refuses_metadata_that_does_not_fit(small_checkpoint, tmp_path):
    meta = official_like_metadata(SMALL)
    tracks = {o: {h: list(meta.tracks(o, h)) for h in HEADS} for o in ORGANISMS}
    tracks["mouse"]["cage"].pop()
    write_textproto(TrackMetadata(tracks), tmp_path / "metadata")
    out = tmp_path / "w.safetensors"
    result = agpipe("convert", small_checkpoint, "-o", out, "--metadata", tmp_path / "metadata")
    assert_fails_in_one_line(result, "track metadata does not fit the model: mouse cage has 4 tracks, the config 5 channels")
    assert not out.exists()


def test_convert_refuses_a_metadata_folder_without_the_files(small_checkpoint, tmp_path):
    (tmp_path / "metadata").mkdir()
    result = agpipe("convert", small_checkpoint, "-o", tmp_path / "w.safetensors", "--metadata", tmp_path / "metadata")
    human = tmp_path / "metadata" / FILES["human"]
    assert_fails_in_one_line(result, f"cannot read track metadata {human}: FileNotFoundError")


EMBED = "alphagenome/embed"
NORM = "alphagenome/sequence_encoder/dna_embedder/conv_block/rms_batch_norm"
T = SMALL.trunk_channels
CORRUPTION = {
    "missing array": (
        lambda params, state: state[NORM].pop("var_ema"),
        f"missing array STATE {NORM}/var_ema: expected (1, 1, {SMALL.encoder_channels}) float32, found nothing",
    ),
    "extra array": (
        lambda params, state: params[EMBED].update(extra=np.zeros((4, 2), np.float32)),
        f"unexpected array {EMBED}/extra: expected nothing (not in the official AlphaGenome tree), found (4, 2) float32",
    ),
    "wrong shape": (
        lambda params, state: params[EMBED].update(embeddings=np.zeros((3, T), np.float32)),
        f"shape mismatch at {EMBED}/embeddings: expected (2, {T}), found (3, {T})",
    ),
    "float16": (
        lambda params, state: params[EMBED].update(embeddings=params[EMBED]["embeddings"].astype(np.float16)),
        f"dtype mismatch at {EMBED}/embeddings: expected float32, found float16",
    ),
}


@pytest.mark.parametrize("corruption", CORRUPTION)
def test_convert_refuses_a_corrupt_checkpoint_in_one_line(tmp_path, corruption):
    edit, message = CORRUPTION[corruption]
    params, state = random_official_tree(SMALL, SEED)
    edit(params, state)
    write_orbax(tmp_path / "checkpoint", params, state)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "w.safetensors"
    assert_fails_in_one_line(agpipe("convert", tmp_path / "checkpoint", "-o", out), message)
    assert os.listdir(tmp_path / "out") == []  # no output, no temporary file


def test_failed_convert_leaves_an_existing_output_alone(tmp_path):
    params, state = random_official_tree(SMALL, SEED)
    del params[EMBED]
    write_orbax(tmp_path / "checkpoint", params, state)
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"previous weights")
    assert agpipe("convert", tmp_path / "checkpoint", "-o", out).exit_code == 2
    assert out.read_bytes() == b"previous weights"


def test_convert_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "weights.bin").write_bytes(b"\0" * 64)
    out = tmp_path / "w.safetensors"
    result = agpipe("convert", tmp_path / "folder", "-o", out)
    assert_fails_in_one_line(
        result, f"no Orbax checkpoint in {tmp_path / 'folder'}: expected _CHECKPOINT_METADATA (the official checkpoint folder)"
    )
    result = agpipe("convert", tmp_path / "nowhere", "-o", out)
    assert_fails_in_one_line(result, f"checkpoint folder {tmp_path / 'nowhere'} does not exist or is not a folder")
    assert not out.exists()


def run_agpipe(*args) -> subprocess.CompletedProcess:
    """The real command in a fresh process: what a user sees, library warnings and logs included."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "agpipe", *map(str, args)], env=env, capture_output=True, text=True, timeout=120)


def test_convert_in_a_real_process_says_one_line(small_checkpoint, tmp_path):
    good = run_agpipe("convert", small_checkpoint, "-o", tmp_path / "w.safetensors")
    assert (good.returncode, good.stderr) == (0, "")
    assert good.stdout.count("\n") == 1 and good.stdout.startswith(f"wrote {tmp_path / 'w.safetensors'}")
    params, state = random_official_tree(SMALL, SEED)
    params[EMBED]["embeddings"] = params[EMBED]["embeddings"].astype(np.float16)
    write_orbax(tmp_path / "bad", params, state)
    bad = run_agpipe("convert", tmp_path / "bad", "-o", tmp_path / "bad.safetensors")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == f"agpipe: error: dtype mismatch at {EMBED}/embeddings: expected float32, found float16\n"
    assert not (tmp_path / "bad.safetensors").exists()


def test_convert_and_load_never_unpickle(small_checkpoint, tmp_path, monkeypatch):
    def unpickling(*args, **kwargs):
        raise AssertionError("something unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, unpickling)
    assert agpipe("convert", small_checkpoint, "-o", tmp_path / "w.safetensors").exit_code == 0
    weights = load_weights(resolve_weights(str(tmp_path / "w.safetensors"), "alphagenome"))
    load_model(weights, 0, DEFAULT_OUTPUTS, FLOAT32, "cpu")
    load_model(load_weights(resolve_weights(None, "demo")), 1, DEFAULT_OUTPUTS, FLOAT32, "cpu")


def test_the_model_is_prepared_where_its_weights_are(monkeypatch):
    """load_model moves the weights to the device before prepare_ folds them (on a GPU that takes
    milliseconds, not the seconds of a worker's one CPU thread). So prepare_ must work on the device's
    tensors without copying them to the host: the meta device, which has no values, checks that."""
    prepare, seen = AlphaGenome.prepare_, set()

    def recording(model, *args, **kwargs):
        seen.update(p.device.type for p in model.parameters())
        return prepare(model, *args, **kwargs)

    monkeypatch.setattr(AlphaGenome, "prepare_", recording)
    model, _ = load_model(load_weights(resolve_weights(None, "demo")), 0, ALL_OUTPUTS, BFLOAT16, "meta")
    assert seen == {"meta"}
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


# ---- config detection ---------------------------------------------------------------------------



def shapes_only(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """A (params, state) tree of jax.ShapeDtypeStruct: shapes without memory."""
    return unflatten_tree({path: jax.ShapeDtypeStruct(shape, np.float32) for path, shape in shapes.items()})


def official_shapes() -> dict[str, tuple[int, ...]]:
    """From tests/data/official_param_tree.txt, not from our table."""
    shapes = {}
    for line in TREE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            path, shape = re.fullmatch(r"(.+) \(([\d, ]*)\) float32", line).groups()
            shapes[path] = tuple(int(n) for n in shape.replace(",", " ").split())
    return shapes


def test_official_checkpoint_is_detected_from_its_shapes():
    assert detect_config(*shapes_only(official_shapes())) == OFFICIAL


def test_small_checkpoint_is_detected():
    assert detect_config(*random_official_tree(SMALL)) == SMALL


def test_a_damaged_checkpoint_is_detected_as_the_size_it_nearly_is():
    """So that the error names the damaged array, not every array of another size."""
    shapes = official_shapes()
    shapes.pop(f"{EMBED}/embeddings")
    shapes[f"STATE {NORM}/var_ema"] = (1, 1, 7)
    assert detect_config(*shapes_only(shapes)) == OFFICIAL
    small = {p: s for p, (_, s) in official_spec(SMALL).items() if not p.startswith("alphagenome/head/")}
    assert detect_config(*shapes_only(small)) == SMALL


def test_official_checkpoint_without_metadata_offline(tmp_path, monkeypatch, home):
    """The official size defaults to the official metadata, which must then be in the cache."""
    zeros = unflatten_tree({p: np.broadcast_to(np.float32(0), s) for p, s in official_shapes().items()})  # no memory
    monkeypatch.setattr(weights_module, "read_orbax", lambda directory: zeros)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "official.safetensors"
    result = agpipe("convert", tmp_path, "-o", out)
    assert_fails_in_one_line(
        result, f"official track metadata not in {home / 'metadata'}: pass --metadata DIR (the official textproto files)"
    )
    assert not out.exists()


@pytest.mark.slow
def test_full_size_checkpoint_converts_bit_exactly(tmp_path):
    tree = random_official_tree(OFFICIAL, seed=1)
    write_orbax(tmp_path / "checkpoint", *tree)
    meta = official_like_metadata(OFFICIAL)
    write_textproto(meta, tmp_path / "metadata")
    out = tmp_path / "official.safetensors"
    result = agpipe("convert", tmp_path / "checkpoint", "-o", out, "--metadata", tmp_path / "metadata")
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.startswith(f"wrote {out} (official AlphaGenome, sha256 ")
    weights = load_weights(out)
    assert weights.cfg == OFFICIAL
    assert_bit_identical(ours_to_official(weights.tensors, OFFICIAL), tree)
    assert same_tracks(TrackMetadata.from_json(weights.metadata_json), meta)


# ---- the official metadata cache ------------------------------------------------------------------


def reference_files() -> dict[str, bytes]:
    if not all((REFERENCE_METADATA / name).is_file() for name in METADATA_SHA256):
        pytest.skip(f"official track metadata not in {REFERENCE_METADATA}")
    return {name: (REFERENCE_METADATA / name).read_bytes() for name in METADATA_SHA256}


def serve(files: dict[str, bytes]):
    import io

    def urlopen(url, timeout=None):
        return io.BytesIO(files[url.rsplit("/", 1)[1]])

    return urlopen


def test_official_metadata_is_downloaded_pinned_and_cached(monkeypatch, home):
    files = reference_files()
    monkeypatch.setattr(urllib.request, "urlopen", serve(files))
    assert official_metadata_dir() == home / "metadata"
    assert {p.name: p.read_bytes() for p in (home / "metadata").iterdir()} == files
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert official_metadata_dir() == home / "metadata"  # from the cache


def test_official_metadata_that_does_not_match_its_pin_is_not_kept(monkeypatch, home):
    monkeypatch.setattr(urllib.request, "urlopen", serve({name: b"output_metadata {}" for name in METADATA_SHA256}))
    with pytest.raises(WeightsError, match=r"^downloaded OutputMetadataResponse_\w+\.textproto does not match its pinned sha256: pass --metadata DIR$"):
        official_metadata_dir()
    assert not (home / "metadata").exists() or os.listdir(home / "metadata") == []


def test_official_metadata_without_a_connection(monkeypatch):
    def unreachable(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(WeightsError, match=r"^cannot download the official track metadata \(.*Name or service not known.*\): pass --metadata DIR"):
        official_metadata_dir()


def test_damaged_cached_metadata_is_not_used_offline(monkeypatch, home):
    (home / "metadata").mkdir(parents=True)
    for name in METADATA_SHA256:
        (home / "metadata" / name).write_text("output_metadata {}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(WeightsError, match="^official track metadata not in .*: pass --metadata DIR"):
        official_metadata_dir()


# ---- agpipe weights download ------------------------------------------------------------------------


def response(status: int) -> types.SimpleNamespace:
    """What HfHubHTTPError reads of an HTTP response."""
    return types.SimpleNamespace(status_code=status, headers={}, request=None)


AUTH = "set HF_TOKEN or run `hf auth login`"
TERMS = f"https://huggingface.co/{REPO}"
DOWNLOAD_ERRORS = {
    "gated": (lambda: hf_errors.GatedRepoError("403 Client Error: gated", response=response(403)), [TERMS, AUTH, "accept"]),
    "401": (lambda: hf_errors.HfHubHTTPError("401 Client Error: Unauthorized", response=response(401)), [TERMS, AUTH, "accept", "401"]),
    "403": (lambda: hf_errors.HfHubHTTPError("403 Client Error: Forbidden", response=response(403)), [TERMS, AUTH, "accept", "403"]),
    "not found": (lambda: hf_errors.RepositoryNotFoundError("401 Client Error: Repository Not Found", response=response(401)), [TERMS, AUTH, "accept"]),
    "offline": (lambda: hf_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), ["HF_HUB_OFFLINE", "unset"]),
    "no connection": (lambda: hf_errors.LocalEntryNotFoundError("An error happened while trying to locate the files"), ["connection"]),
    "server error": (lambda: hf_errors.HfHubHTTPError("500 Server Error: Internal Server Error\nfor url", response=response(500)), ["500 Server Error"]),
}


def all_bytes_written(*roots: Path) -> bytes:
    return b"".join(p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("error", DOWNLOAD_ERRORS)
def test_download_errors_say_what_to_do_in_one_line(monkeypatch, tmp_path, error):
    make, hints = DOWNLOAD_ERRORS[error]
    if error == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def snapshot_download(**kwargs):
        raise make()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = agpipe("weights", "download")
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith("agpipe: error: ") and result.stderr.count("\n") == 1
    assert all(hint in result.stderr for hint in hints), result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert not weights_dir().exists() or os.listdir(weights_dir()) == []


def test_download_converts_into_the_cache_by_name(small_checkpoint, monkeypatch, tmp_path, home):
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision, kwargs))
        return str(small_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = agpipe("weights", "download", "--name", "fold-0", "--repo", "google/alphagenome-fold-0", "--revision", "v1")
    path = home / "weights" / "fold-0.safetensors"
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == f"weights ready: {path} (use --weights fold-0)\n"
    assert calls == [("google/alphagenome-fold-0", "v1", {})]  # the token is huggingface_hub's business
    assert resolve_weights("fold-0", "alphagenome") == path
    assert_bit_identical(ours_to_official(load_weights(path).tensors, SMALL), random_official_tree(SMALL, SEED))
    assert os.listdir(home / "weights") == ["fold-0.safetensors"]
    assert TOKEN.encode() not in all_bytes_written(tmp_path, small_checkpoint.parent)
    assert TOKEN not in result.stdout + result.stderr


def test_download_refuses_a_name_that_is_not_a_file_name(monkeypatch):
    result = agpipe("weights", "download", "--name", "../elsewhere")
    assert_fails_in_one_line(result, "weights name '../elsewhere' must be letters, digits, '.', '_' or '-'")


# ---- finding weights ---------------------------------------------------------------------------------


def test_demo_is_the_default_for_the_demo_model(home):
    path = resolve_weights(None, "demo")
    assert path == home / "weights" / "demo-v1.safetensors"
    weights = load_weights(path)
    assert weights.cfg == SMALL
    assert weights.metadata_json == synthetic_metadata(SMALL).to_json()


def test_demo_weights_are_deterministic(tmp_path, monkeypatch):
    files = []
    for name in ("one", "two"):
        monkeypatch.setenv("AGPIPE_HOME", str(tmp_path / name))
        files.append(demo_weights().read_bytes())
    assert files[0] == files[1]


def test_demo_weights_are_written_once(home):
    path = demo_weights()
    before = path.stat()
    assert demo_weights() == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_weights_by_path(tmp_path):
    (tmp_path / "mine.safetensors").write_bytes(b"")
    assert resolve_weights(str(tmp_path / "mine.safetensors"), "alphagenome") == tmp_path / "mine.safetensors"
    assert resolve_weights(str(tmp_path / "mine.safetensors"), "demo") == tmp_path / "mine.safetensors"
    with pytest.raises(WeightsError, match=f"^weights file {re.escape(str(tmp_path / 'gone.safetensors'))} does not exist$"):
        resolve_weights(str(tmp_path / "gone.safetensors"), "alphagenome")


def test_weights_by_name(home):
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "all-folds.safetensors").write_bytes(b"")
    (home / "weights" / "fold-1.safetensors").write_bytes(b"")
    assert resolve_weights("fold-1", "alphagenome") == home / "weights" / "fold-1.safetensors"
    assert resolve_weights(None, "alphagenome") == home / "weights" / "all-folds.safetensors"


@pytest.mark.parametrize("spec", [None, "all-folds", "fold-3"])
def test_missing_weights_say_how_to_get_them(spec, home):
    with pytest.raises(WeightsError) as e:
        resolve_weights(spec, "alphagenome")
    message = str(e.value)
    assert "\n" not in message
    assert f"no AlphaGenome weights named '{spec or 'all-folds'}' in {home / 'weights'}" in message
    assert "`agpipe weights download`" in message and "--model demo" in message
