"""The official checkpoint tree <-> our weights file (agpipe/model/checkpoint.py).

- The mapping table reproduces the official parameter tree (tests/data/official_param_tree.txt)
  path for path and shape for shape, without allocating the model.
- Official tree -> our tensors -> safetensors -> official tree is bit-exact, also through Orbax.
- Every kind of damage stops with one line naming the path, what was expected and what was found.
- Reading a weights file never unpickles anything.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from agpipe.model import checkpoint
from agpipe.model.alphagenome import AlphaGenome
from agpipe.model.checkpoint import (
    FORMAT,
    CheckpointError,
    config_to_json,
    file_sha256,
    flatten_tree,
    load_weights,
    official_spec,
    official_to_ours,
    our_shapes,
    ours_to_official,
    random_official_tree,
    read_orbax,
    save_weights,
    unflatten_tree,
    write_orbax,
)
from agpipe.model.config import OFFICIAL, SMALL
from agpipe.model.metadata import synthetic_metadata
from agpipe.model.param_mapping import mapping

TREE_FILE = Path(__file__).parent / "data" / "official_param_tree.txt"
OFFICIAL_PARAMETERS = 450_452_613
OFFICIAL_STATE = 100_608  # RMSBatchNorm var_ema


def official_tree_file() -> dict[str, tuple[tuple[int, ...], str]]:
    """'[STATE ]module/path/name' -> (shape, dtype), as listed in official_param_tree.txt."""
    tree = {}
    for line in TREE_FILE.read_text().splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"((?:STATE )?\S+) \(([\d, ]*)\) (\w+)", line)
        assert m, f"unparsable line {line!r}"
        path, shape, dtype = m.groups()
        tree[path] = (tuple(int(n) for n in shape.replace(",", " ").split()), dtype)
    return tree




def assert_bit_identical(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """Same paths, and at every path the same dtype, shape and bytes."""
    fa, fb = flatten_tree(*a), flatten_tree(*b)
    assert sorted(fa) == sorted(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), path
        assert x.tobytes() == y.tobytes(), path


# ---- the table against the official tree --------------------------------------------------------


def test_table_reproduces_the_official_tree_path_for_path_and_shape_for_shape():
    truth = official_tree_file()
    spec = official_spec(OFFICIAL)
    assert sorted(set(truth) - set(spec)) == [], "official arrays the table does not map"
    assert sorted(set(spec) - set(truth)) == [], "arrays the table invents"
    wrong = {p: (shape, truth[p][0]) for p, (_, shape) in spec.items() if shape != truth[p][0]}
    assert wrong == {}, "path: (table shape, official shape)"
    assert {dtype for _, dtype in truth.values()} == {"float32"}


def test_official_parameter_count():
    spec = official_spec(OFFICIAL)
    count = {False: 0, True: 0}
    for entry, shape in spec.values():
        count[entry.state] += int(np.prod(shape))
    assert count == {False: OFFICIAL_PARAMETERS, True: OFFICIAL_STATE}
    assert len(spec) == len(official_tree_file()) == 670


def test_our_model_is_float32_and_its_shapes_need_no_memory():
    with torch.device("meta"):
        model = AlphaGenome(OFFICIAL)
    tensors = model.state_dict()
    assert all(t.is_meta and t.dtype == torch.float32 for t in tensors.values())
    assert sum(t.numel() for t in tensors.values()) == OFFICIAL_PARAMETERS + OFFICIAL_STATE
    assert our_shapes(OFFICIAL) == {k: tuple(t.shape) for k, t in tensors.items()}


@pytest.mark.parametrize("cfg", [SMALL, OFFICIAL], ids=["small", "official"])
def test_table_is_one_to_one_with_our_tensors(cfg):
    table = mapping(cfg)
    assert len({e.official for e in table}) == len(table), "an official path mapped twice"
    assert len({e.ours for e in table}) == len(table), "one of our tensors mapped twice"
    assert {e.ours for e in table} == set(our_shapes(cfg))
    assert all(e.state == (e.official.rpartition("/")[2] == "var_ema") for e in table)


def test_small_config_has_the_official_structure_scaled_down():
    small, official = official_spec(SMALL), official_spec(OFFICIAL)
    assert set(small) < set(official)  # fewer layers, same names
    assert all(len(shape) == len(official[p][1]) for p, (_, shape) in small.items())
    assert all(entry == official[p][0] for p, (entry, _) in small.items())


def test_full_size_mapping_round_trip_without_allocating():
    """Every official array becomes a zero-stride array holding its own index, so a mix-up or a
    copy shows, and 1.8 GB are never allocated."""
    truth = official_tree_file()
    index = {path: i for i, path in enumerate(truth)}
    params, state = unflatten_tree(
        {p: np.broadcast_to(np.float32(index[p]), shape) for p, (shape, _) in truth.items()}
    )
    tensors = official_to_ours(params, state, OFFICIAL)
    assert {k: t.shape for k, t in tensors.items()} == our_shapes(OFFICIAL)
    assert all(t.strides == (0,) * t.ndim for t in tensors.values()), "a tensor was copied"
    spec = official_spec(OFFICIAL)
    assert all(tensors[entry.ours].flat[0] == index[p] for p, (entry, _) in spec.items())
    back = flatten_tree(*ours_to_official(tensors, OFFICIAL))
    assert {p: a.shape for p, a in back.items()} == {p: shape for p, (shape, _) in truth.items()}
    assert all(a.flat[0] == index[p] for p, a in back.items())


# ---- bit-exact round trips -------------------------------------------------------------------------


def test_round_trip_through_our_weights_file_is_bit_exact(tmp_path):
    tree = random_official_tree(SMALL, seed=7)
    metadata = synthetic_metadata(SMALL).to_json()
    save_weights(tmp_path / "w.safetensors", official_to_ours(*tree, SMALL), SMALL, metadata)
    weights = load_weights(tmp_path / "w.safetensors")
    assert weights.cfg == SMALL
    assert weights.metadata_json == metadata
    assert weights.sha256 == file_sha256(tmp_path / "w.safetensors")
    assert_bit_identical(ours_to_official(weights.tensors, weights.cfg), tree)
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary file left behind


def test_round_trip_through_orbax_is_bit_exact(tmp_path):
    tree = random_official_tree(SMALL, seed=8)
    write_orbax(tmp_path / "checkpoint", *tree)
    restored = read_orbax(tmp_path / "checkpoint")
    assert_bit_identical(restored, tree)
    save_weights(tmp_path / "w.safetensors", official_to_ours(*restored, SMALL), SMALL, "{}")
    weights = load_weights(tmp_path / "w.safetensors")
    assert_bit_identical(ours_to_official(weights.tensors, weights.cfg), tree)


def test_the_same_weights_always_give_the_same_file(tmp_path):
    """The file's sha256 identifies the weights (run provenance), so it must not vary."""
    tensors = official_to_ours(*random_official_tree(SMALL, seed=9), SMALL)
    metadata = synthetic_metadata(SMALL).to_json()
    for name in "abc":
        save_weights(tmp_path / f"{name}.safetensors", tensors, SMALL, metadata)
    digests = {file_sha256(tmp_path / f"{name}.safetensors") for name in "abc"}
    assert len(digests) == 1


def test_weights_file_is_plain_safetensors(tmp_path):
    """Any safetensors reader sees our tensors and our header (format, config, tracks)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = official_to_ours(*random_official_tree(SMALL, seed=10), SMALL)
    save_weights(tmp_path / "w.safetensors", tensors, SMALL, "{}")
    loaded = load_file(tmp_path / "w.safetensors")
    assert sorted(loaded) == sorted(tensors)
    assert all(loaded[k].tobytes() == tensors[k].tobytes() for k in tensors)
    with safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": FORMAT, "config": config_to_json(SMALL), "tracks": "{}"}


# ---- damaged trees: one line naming the path, the expected and the found -------------------------

EMBED = "alphagenome/embed"  # embeddings (2, C)
NORM = "alphagenome/sequence_encoder/dna_embedder/conv_block/rms_batch_norm"  # scale (1, 1, C), var_ema
PROJ = "alphagenome/output_embedder/linear"  # w (C, 2C)
DECODER = "alphagenome/sequence_decoder/up_res_block"  # residual_scale ()

Tree = tuple[dict, dict]


def drop(module: str, name: str, state: bool = False) -> Callable[[Tree], None]:
    return lambda tree: tree[state][module].pop(name)


def put(module: str, name: str, value: Callable[[np.ndarray | None], np.ndarray], state=False):
    def edit(tree: Tree) -> None:
        arrays = tree[state].setdefault(module, {})
        arrays[name] = value(arrays.get(name))

    return edit


def move_to_params(module: str, name: str) -> Callable[[Tree], None]:
    def edit(tree: Tree) -> None:
        tree[0][module][name] = tree[1][module].pop(name)

    return edit


C = SMALL.encoder_channels
T = SMALL.trunk_channels
DAMAGE = {
    "missing parameter": (drop(EMBED, "embeddings"), f"missing array {EMBED}/embeddings: expected (2, {T}) float32, found nothing"),
    "missing state": (
        drop(NORM, "var_ema", state=True),
        f"missing array STATE {NORM}/var_ema: expected (1, 1, {C}) float32, found nothing",
    ),
    "extra array": (
        put(EMBED, "extra", lambda _: np.zeros(3, np.float32)),
        f"unexpected array {EMBED}/extra: expected nothing (not in the official AlphaGenome tree), found (3,) float32",
    ),
    "extra module": (
        put("alphagenome/other", "w", lambda _: np.zeros((2, 2), np.float32)),
        "unexpected array alphagenome/other/w: expected nothing (not in the official AlphaGenome tree), found (2, 2) float32",
    ),
    "state saved as a parameter": (
        move_to_params(NORM, "var_ema"),
        f"unexpected array {NORM}/var_ema: expected nothing (not in the official AlphaGenome tree), found (1, 1, {C}) float32",
    ),
    "transposed": (
        put(PROJ, "w", lambda a: a.T.copy()),
        f"shape mismatch at {PROJ}/w: expected ({T}, {2 * T}), found ({2 * T}, {T})",
    ),
    "leading axes dropped": (
        put(NORM, "scale", lambda a: a.reshape(-1)),
        f"shape mismatch at {NORM}/scale: expected (1, 1, {C}), found ({C},)",
    ),
    "float16": (put(EMBED, "embeddings", lambda a: a.astype(np.float16)), f"dtype mismatch at {EMBED}/embeddings: expected float32, found float16"),
    "bfloat16": (
        put(DECODER, "residual_scale", lambda a: a.astype("bfloat16")),
        f"dtype mismatch at {DECODER}/residual_scale: expected float32, found bfloat16",
    ),
    "float64 state": (
        put(NORM, "var_ema", lambda a: a.astype(np.float64), state=True),
        f"dtype mismatch at STATE {NORM}/var_ema: expected float32, found float64",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_tree_is_refused_in_one_line(damage):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    edit, message = DAMAGE[damage]
    tree = random_official_tree(SMALL, seed=11)
    edit(tree)
    with pytest.raises(CheckpointError) as e:
        official_to_ours(*tree, SMALL)
    assert str(e.value) == message


def test_ours_to_official_names_a_missing_tensor():
    tensors = official_to_ours(*random_official_tree(SMALL, seed=12), SMALL)
    del tensors["organism.embeddings"]
    with pytest.raises(CheckpointError, match=r"^missing tensor organism\.embeddings \(official alphagenome/embed/embeddings\)$"):
        ours_to_official(tensors, SMALL)


# ---- damaged or foreign weights files ----------------------------------------------------------------


def good_tensors(seed: int = 13) -> dict[str, np.ndarray]:
    return official_to_ours(*random_official_tree(SMALL, seed=seed), SMALL)


def write_with_our_header(path: Path, tensors: dict[str, np.ndarray], **header: str) -> None:
    """A safetensors file written by someone else's code, claiming to be ours."""
    from safetensors.numpy import save_file

    header = {"format": FORMAT, "config": config_to_json(SMALL), "tracks": "{}"} | header
    save_file({k: np.array(v) for k, v in tensors.items()}, str(path), metadata=header)


class Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def not_ours(path: Path) -> str:
    return re.escape(f"{path} is not an agpipe weights file (")


FOREIGN = {
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
    "empty file": lambda path: path.write_bytes(b""),
    "pickle": lambda path: path.write_bytes(pickle.dumps({"w": Payload(path.with_name("unpickled"))})),
    "torch.save": lambda path: torch.save({"w": torch.zeros(3), "p": Payload(path.with_name("unpickled"))}, path),
    "safetensors without our header": lambda path: write_with_our_header(path, good_tensors(), format="pt"),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_foreign_file_is_refused_and_never_unpickled(tmp_path, kind):
    path = tmp_path / "weights.safetensors"
    FOREIGN[kind](path)
    with pytest.raises(CheckpointError, match=not_ours(path)) as e:
        load_weights(path)
    assert "\n" not in str(e.value) and "agpipe convert" in str(e.value)
    assert not (tmp_path / "unpickled").exists()


def test_the_pickle_payload_is_live():
    """Guards the test above: the payload does run when something unpickles it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        marker = Path(d, "unpickled")
        pickle.loads(pickle.dumps(Payload(marker)))
        assert marker.exists()


def test_weights_file_with_a_wrong_shape(tmp_path):
    tensors = good_tensors()
    tensors["embed128.linear.w"] = tensors["embed128.linear.w"].T
    write_with_our_header(tmp_path / "w.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "w.safetensors")
    assert str(e.value) == f"weights file {tmp_path / 'w.safetensors'}: embed128.linear.w has shape ({2 * T}, {T}), expected ({T}, {2 * T})"


def test_weights_file_with_a_wrong_dtype(tmp_path):
    tensors = good_tensors()
    tensors["organism.embeddings"] = tensors["organism.embeddings"].astype(np.float16)
    write_with_our_header(tmp_path / "w.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "w.safetensors")
    assert str(e.value) == f"weights file {tmp_path / 'w.safetensors'}: organism.embeddings has dtype float16, expected float32"


def test_weights_file_with_a_missing_or_an_extra_tensor(tmp_path):
    tensors = good_tensors()
    shape = tensors.pop("organism.embeddings").shape
    write_with_our_header(tmp_path / "missing.safetensors", tensors)
    with pytest.raises(CheckpointError, match=re.escape(f": missing tensor organism.embeddings, expected {shape} float32")):
        load_weights(tmp_path / "missing.safetensors")
    write_with_our_header(tmp_path / "extra.safetensors", good_tensors() | {"extra.w": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=re.escape(": unexpected tensor extra.w (2,), expected none")):
        load_weights(tmp_path / "extra.safetensors")


def test_weights_file_with_a_damaged_header(tmp_path):
    write_with_our_header(tmp_path / "w.safetensors", good_tensors(), config="{not json")
    with pytest.raises(CheckpointError, match=re.escape(f"weights file {tmp_path / 'w.safetensors'} has a damaged header (")):
        load_weights(tmp_path / "w.safetensors")


def test_truncated_weights_file(tmp_path):
    save_weights(tmp_path / "w.safetensors", good_tensors(), SMALL, "{}")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=not_ours(tmp_path / "w.safetensors")):
        load_weights(tmp_path / "w.safetensors")


def test_missing_weights_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"^weights file {re.escape(str(tmp_path / 'no.safetensors'))} does not exist$"):
        load_weights(tmp_path / "no.safetensors")


def test_saving_refuses_an_incomplete_set(tmp_path):
    tensors = good_tensors()
    del tensors["organism.embeddings"]
    with pytest.raises(CheckpointError, match="^cannot save weights: missing tensor organism.embeddings$"):
        save_weights(tmp_path / "w.safetensors", tensors, SMALL, "{}")
    assert os.listdir(tmp_path) == []


# ---- Orbax folders that are not AlphaGenome checkpoints ------------------------------------------


def test_folder_without_a_checkpoint(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "README.md").write_text("weights")
    with pytest.raises(CheckpointError, match=f"^no Orbax checkpoint in {re.escape(str(tmp_path))}: expected _CHECKPOINT_METADATA"):
        read_orbax(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist or is not a folder"):
        read_orbax(tmp_path / "README.md")


def test_checkpoint_one_level_down_is_found(tmp_path):
    tree = random_official_tree(SMALL, seed=14)
    write_orbax(tmp_path / "snapshot" / "checkpoint", *tree)
    assert_bit_identical(read_orbax(tmp_path / "snapshot"), tree)


def test_orbax_checkpoint_of_something_else(tmp_path):
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "other").absolute(), {"layer": {"w": np.zeros(3, np.float32)}, "step": np.int32(1)})
    checkpointer.wait_until_finished()
    with pytest.raises(CheckpointError, match=r"other is not an AlphaGenome checkpoint: expected a \(params, state\) pair"):
        read_orbax(tmp_path / "other")


def test_damaged_orbax_checkpoint(tmp_path):
    write_orbax(tmp_path / "checkpoint", *random_official_tree(SMALL, seed=15))
    (tmp_path / "checkpoint" / "manifest.ocdbt").write_bytes(b"damaged")
    root = re.escape(str(tmp_path / "checkpoint"))
    with pytest.raises(CheckpointError, match=f"^cannot read Orbax checkpoint {root}: .*manifest") as e:
        read_orbax(tmp_path / "checkpoint")
    assert "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)


def test_a_files_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    memo = tmp_path / "memo"
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 4096)
    assert file_sha256(path, memo) == hashlib.sha256(b"a" * 4096).hexdigest()
    assert not memo.exists()  # just written: a change in the same clock tick would keep its stat
    monkeypatch.setattr(checkpoint, "MEMO_SETTLED_SECONDS", -1.0)
    file_sha256(path, memo)
    (remembered,) = memo.iterdir()
    remembered.write_text("f" * 64)  # what a second call returns proves where it came from
    assert file_sha256(path, memo) == "f" * 64
    assert file_sha256(path) == hashlib.sha256(b"a" * 4096).hexdigest()  # no memo: always hashed
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    path.write_bytes(b"b" * 4096)  # same size, same inode: its times moved
    assert file_sha256(path, memo) == hashlib.sha256(b"b" * 4096).hexdigest()
