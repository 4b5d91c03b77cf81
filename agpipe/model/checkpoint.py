"""Official checkpoint <-> our weights file, through the one mapping table.

- An official checkpoint is an Orbax StandardCheckpointer tree `(params, state)`: Haiku nested dicts
  {'module/path': {'name': array}}, float32.
- Our weights file is safetensors: tensors named by `param_mapping` (our PyTorch state_dict keys),
  plus, in the header, the model config and the track metadata (JSON). It never holds code, so
  loading it never unpickles anything.

Conversion is strict: every official array used exactly once and every shape and dtype checked;
a mismatch stops with one line naming the path, the expected and the found value.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from agpipe.model.config import ModelConfig
from agpipe.model.param_mapping import Entry, mapping

FORMAT = "agpipe-weights-v1"
Tree = dict[str, dict[str, np.ndarray]]


class CheckpointError(ValueError):
    """A checkpoint or weights file that does not match the architecture (one-line message)."""


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of our tensors for a config, without allocating them."""
    import torch

    from agpipe.model.alphagenome import AlphaGenome

    with torch.device("meta"):
        model = AlphaGenome(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def official_spec(cfg: ModelConfig) -> dict[str, tuple[Entry, tuple[int, ...]]]:
    """'[STATE ]module/path/name' -> (table entry, official shape)."""
    shapes = our_shapes(cfg)
    return {
        ("STATE " if e.state else "") + e.official: (e, (1,) * e.lead + shapes[e.ours]) for e in mapping(cfg)
    }


def _split(path: str) -> tuple[str, str]:
    module, _, name = path.rpartition("/")
    return module, name


def flatten_tree(params: Mapping, state: Mapping) -> dict[str, np.ndarray]:
    """(params, state) -> {'module/path/name': array, 'STATE module/path/name': array}."""
    flat = {}
    for prefix, tree in (("", params), ("STATE ", state)):
        for module, arrays in tree.items():
            for name, array in arrays.items():
                flat[f"{prefix}{module}/{name}"] = array
    return flat


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> tuple[Tree, Tree]:
    """The inverse of flatten_tree: flat paths -> Haiku's (params, state) {module: {name: array}}."""
    params: Tree = {}
    state: Tree = {}
    for path, array in flat.items():
        module, name = _split(path.removeprefix("STATE "))
        (state if path.startswith("STATE ") else params).setdefault(module, {})[name] = array
    return params, state


def official_to_ours(params: Mapping, state: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Maps an official (params, state) tree to our tensors; strict about names, shapes and dtypes."""
    spec = official_spec(cfg)
    flat = flatten_tree(params, state)
    for path in flat:
        if path not in spec:
            found = f"{tuple(np.shape(flat[path]))} {np.dtype(flat[path].dtype)}"
            raise CheckpointError(f"unexpected array {path}: expected nothing (not in the official AlphaGenome tree), found {found}")
    tensors = {}
    for path, (entry, shape) in spec.items():
        if path not in flat:
            raise CheckpointError(f"missing array {path}: expected {shape} float32, found nothing")
        array = flat[path]
        if tuple(np.shape(array)) != shape:
            raise CheckpointError(f"shape mismatch at {path}: expected {shape}, found {tuple(np.shape(array))}")
        if np.dtype(array.dtype) != np.float32:
            raise CheckpointError(f"dtype mismatch at {path}: expected float32, found {np.dtype(array.dtype)}")
        tensors[entry.ours] = np.asarray(array).reshape(shape[entry.lead :])
    return tensors


def ours_to_official(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> tuple[Tree, Tree]:
    """The inverse mapping: our tensors -> official (params, state), e.g. to run the JAX reference."""
    flat = {}
    for path, (entry, shape) in official_spec(cfg).items():
        if entry.ours not in tensors:
            raise CheckpointError(f"missing tensor {entry.ours} (official {entry.official})")
        flat[path] = np.asarray(tensors[entry.ours]).reshape(shape)
    return unflatten_tree(flat)


def random_official_tree(cfg: ModelConfig, seed: int = 0) -> tuple[Tree, Tree]:
    """A complete official-layout tree with random values of realistic scale (tests, the demo model).

    Weights are N(0, 1/fan_in); norm scales near 1 and var_ema in [0.5, 2]; residual branches are
    damped (branch-output norms 0.3, conv scales 0.5, decoder residual_scale 0.5) so activations stay
    O(1) through the encoder, tower and decoder, as in a trained model. An undamped random model
    grows its activations ~30x through the decoder and amplifies bfloat16 rounding accordingly.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, (entry, shape) in official_spec(cfg).items():
        module, name = _split(entry.official)
        if name == "var_ema":
            value = rng.uniform(0.5, 2.0, shape)
        elif name == "scale" and module.endswith("rms_batch_norm_1"):
            value = 0.3 * (1.0 + 0.1 * rng.standard_normal(shape))  # residual branch outputs
        elif name == "scale" and module.endswith("standardized_conv1_d"):
            value = 0.5 * (1.0 + 0.1 * rng.standard_normal(shape))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name in ("offset", "b", "bias"):
            value = 0.05 * rng.standard_normal(shape)
        elif name == "residual_scale":
            value = np.full(shape, 0.5)
        elif name == "learnt_scale":
            value = 0.5 * rng.standard_normal(shape)
        elif name == "embeddings":
            value = 0.1 * rng.standard_normal(shape)
        elif name in ("q_r_bias", "k_r_bias"):
            value = 0.05 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[:-1])) if "conv" in module else shape[-2] if len(shape) >= 2 else 1
            value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        flat[path] = value.astype(np.float32)
    return unflatten_tree(flat)


# ---- Orbax --------------------------------------------------------------------------------------


def find_orbax_root(directory: str | os.PathLike) -> Path:
    """The folder holding the Orbax checkpoint: `directory` itself or one level below it."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist or is not a folder")
    for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (candidate / "_CHECKPOINT_METADATA").exists() or (candidate / "_METADATA").exists():
            return candidate
    raise CheckpointError(f"no Orbax checkpoint in {root}: expected _CHECKPOINT_METADATA (the official checkpoint folder)")


def read_orbax(directory: str | os.PathLike) -> tuple[Tree, Tree]:
    """Reads an official `(params, state)` Orbax checkpoint as numpy arrays."""
    import orbax.checkpoint as ocp

    root = find_orbax_root(directory)
    try:
        tree = ocp.StandardCheckpointer().restore(root.absolute())
    except Exception as e:  # orbax raises many kinds; the user needs the folder and the reason
        reason = str(e).splitlines()[0].split(" [tensorstore_spec=")[0]  # not the store's whole JSON spec
        raise CheckpointError(f"cannot read Orbax checkpoint {root}: {reason}") from e

    def is_tree(t) -> bool:  # Haiku's {'module/path': {'name': array}}
        return isinstance(t, Mapping) and all(
            isinstance(arrays, Mapping) and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in arrays.values())
            for arrays in t.values()
        )

    if not isinstance(tree, (list, tuple)) or len(tree) != 2 or not all(is_tree(t) for t in tree):
        raise CheckpointError(f"{root} is not an AlphaGenome checkpoint: expected a (params, state) pair of {{module: {{name: array}}}}")
    params, state = ({m: {n: np.asarray(a) for n, a in arrays.items()} for m, arrays in t.items()} for t in tree)
    return params, state


def write_orbax(directory: str | os.PathLike, params: Tree, state: Tree) -> None:
    """Saves `(params, state)` exactly as the official checkpoints are saved (tests and tooling)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(Path(directory).absolute(), (params, state))
    checkpointer.wait_until_finished()


# ---- our weights file ---------------------------------------------------------------------------


@dataclasses.dataclass
class WeightsFile:
    path: Path
    cfg: ModelConfig
    tensors: dict[str, np.ndarray]
    metadata_json: str
    sha256: str


def config_to_json(cfg: ModelConfig) -> str:
    fields = dataclasses.asdict(cfg)
    fields["head_channels"] = [list(x) for x in cfg.head_channels]
    return json.dumps(fields, sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    fields = json.loads(text)
    fields["head_channels"] = tuple((str(h), int(c)) for h, c in fields["head_channels"])
    return ModelConfig(**fields)


# A digest is remembered only for files last changed this long before it was taken: a later change
# then always moves the file's timestamps (git's "racily clean" rule).
MEMO_SETTLED_SECONDS = 2.0


def file_sha256(path: str | os.PathLike, memo: Path | None = None) -> str:
    """The file's sha256. With `memo` (a folder, weights.sha256_memo()), remembered by the file's
    identity and stat (size, mtime, ctime: every write moves ctime): hashing a 1.4 GB weights file
    took ~3 s on the GPU machines, in the driver and again in every worker at each start."""
    stamp = os.stat(path)
    key = f"{os.path.realpath(path)}|{stamp.st_dev}|{stamp.st_ino}|{stamp.st_size}|{stamp.st_mtime_ns}|{stamp.st_ctime_ns}"
    remembered = memo / hashlib.sha256(key.encode()).hexdigest() if memo is not None else None
    if remembered is not None:
        try:
            return remembered.read_text().strip()
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    settled = max(stamp.st_mtime_ns, stamp.st_ctime_ns) / 1e9 < time.time() - MEMO_SETTLED_SECONDS
    if remembered is not None and settled and os.stat(path) == stamp:
        try:  # best effort: a read-only cache only means hashing again next time
            remembered.parent.mkdir(parents=True, exist_ok=True)
            temp = remembered.with_name(f".{remembered.name}.{os.getpid()}.partial")
            temp.write_text(digest)
            os.replace(temp, remembered)
        except OSError:
            pass
    return digest


def _write_safetensors(file, tensors: Mapping[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), written
    with sorted keys so that the same weights always give the same bytes: the safetensors library
    orders the header's metadata differently from one call to the next."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key in sorted(tensors):
        array = tensors[key]
        if array.dtype != np.float32:
            raise CheckpointError(f"cannot save weights: {key} is {array.dtype}, expected float32")
        header[key] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    file.write(len(text).to_bytes(8, "little") + text)
    for key in sorted(tensors):
        file.write(np.ascontiguousarray(tensors[key], dtype="<f4").tobytes())


def save_weights(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], cfg: ModelConfig, metadata_json: str) -> None:
    """Writes our weights file atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    expected = our_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"cannot save weights: missing tensor {missing[0]}")
    header = {"format": FORMAT, "config": config_to_json(cfg), "tracks": metadata_json}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_safetensors(f, {k: np.asarray(tensors[k]) for k in expected}, header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_weights_header(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(config, track metadata JSON) of our weights file, without reading its tensors: what a job's
    planner needs (columns, channel counts) before any worker loads the model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from e
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an agpipe weights file: convert an official checkpoint with `agpipe convert`")
    return config_from_json(header["config"]), header["tracks"]


def load_weights(path: str | os.PathLike, memo: Path | None = None) -> WeightsFile:
    """Reads our weights file (safetensors only) and checks every tensor against the config it
    names; `memo` as for file_sha256."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    # Hashing runs beside the parsing (hashlib lets go of the GIL): ~1 s less for the full model.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sha256 = pool.submit(file_sha256, path, memo)
        tensors, cfg, metadata_json = _read_checked(path)
    return WeightsFile(path, cfg, tensors, metadata_json, sha256.result())


def _read_checked(path: Path) -> tuple[dict[str, np.ndarray], ModelConfig, str]:
    """load_weights' reading: the tensors, checked against the config and track metadata it names."""
    from safetensors import safe_open

    not_ours = f"{path} is not an agpipe weights file"
    how = "write one with `agpipe convert` or `agpipe weights download`"
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{not_ours} (no {FORMAT} header): {how}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{not_ours} (not readable as safetensors: {str(e).splitlines()[0]}): {how}") from e
    try:
        cfg = config_from_json(header["config"])
        metadata_json = header["tracks"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"weights file {path} has a damaged header ({type(e).__name__}: {e}): {how}") from None
    expected = our_shapes(cfg)
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(f"weights file {path}: missing tensor {key}, expected {shape} float32")
        if shape == () and tensors[key].shape == (1,):
            tensors[key] = tensors[key].reshape(())  # earlier agpipe versions wrote scalars as (1,)
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"weights file {path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
        if tensors[key].dtype != np.float32:
            raise CheckpointError(f"weights file {path}: {key} has dtype {tensors[key].dtype}, expected float32")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"weights file {path}: unexpected tensor {extra[0]} {tuple(tensors[extra[0]].shape)}, expected none")
    return tensors, cfg, metadata_json
