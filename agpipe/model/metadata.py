"""Track metadata: what each output channel of each head is, per organism, carried with our weights.

DeepMind publishes it as one textproto file per organism (`OutputMetadataResponse_ORGANISM_*`). The
model needs two things from it (which channels are padding, and each track's `nonzero_mean`, the
data-space scale); output files need the rest (names, strands, biosamples, ...). We read the files
with a small reader of our own (no protobuf dependency) and embed the result in the weights file as
JSON, so a weights file always says what its channels mean.

    meta = load_metadata("reference/metadata")        # or synthetic_metadata(cfg) for a demo model
    meta.check_against(cfg)
    header["__metadata__"]["tracks"] = meta.to_json()   # TrackMetadata.from_json(...) on load
    tracks = {head: meta.head_tracks("human", head) for head in HEADS}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from agpipe.model.config import HEADS, ORGANISMS, ModelConfig

Organism = str | int  # "human" / "mouse", or the organism index 0 / 1

FILES = {
    "human": "OutputMetadataResponse_ORGANISM_HOMO_SAPIENS.textproto",
    "mouse": "OutputMetadataResponse_ORGANISM_MUS_MUSCULUS.textproto",
}

# The official OutputType names -> our head names.
OUTPUT_TYPES = {
    "OUTPUT_TYPE_ATAC": "atac",
    "OUTPUT_TYPE_CAGE": "cage",
    "OUTPUT_TYPE_DNASE": "dnase",
    "OUTPUT_TYPE_RNA_SEQ": "rna_seq",
    "OUTPUT_TYPE_CHIP_HISTONE": "chip_histone",
    "OUTPUT_TYPE_CHIP_TF": "chip_tf",
    "OUTPUT_TYPE_SPLICE_SITES": "splice_sites_classification",
    "OUTPUT_TYPE_SPLICE_SITE_USAGE": "splice_sites_usage",
    "OUTPUT_TYPE_SPLICE_JUNCTIONS": "splice_sites_junction",
    "OUTPUT_TYPE_CONTACT_MAPS": "contact_maps",
    "OUTPUT_TYPE_PROCAP": "procap",
}


@dataclasses.dataclass(frozen=True)
class HeadTracks:
    """What the model needs to know of a head's tracks for one organism."""

    padding: np.ndarray  # (channels,) bool: True for padding tracks
    nonzero_mean: np.ndarray  # (channels,) float32: data-space scale per track (1.0 where unknown)


@dataclasses.dataclass(frozen=True)
class Track:
    """One output channel of a head (junctions: one tissue). Text fields absent from the source are ''."""

    name: str
    strand: str = ""  # '+', '-', '.'; '' for junction tissues, which have no strand
    assay: str = ""
    biosample_name: str = ""
    biosample_type: str = ""  # 'primary_cell', 'cell_line', 'tissue', ... as the official SDK writes it
    biosample_stage: str = ""
    ontology_curie: str = ""  # 'CL:0000084', as the official SDK formats it
    gtex_tissue: str = ""
    data_source: str = ""
    endedness: str = ""  # 'paired' or 'single'
    genetically_modified: bool | None = None
    transcription_factor: str = ""
    histone_mark: str = ""
    nonzero_mean: float = math.nan  # a float32 value (the proto field is a float); NaN when absent

    @property
    def padding(self) -> bool:
        # The official rule: padding channels are the tracks named "padding", in any case.
        return self.name.lower() == "padding"


FIELDS = tuple(f.name for f in dataclasses.fields(Track))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Track)}


def _organism(organism: Organism) -> str:
    if isinstance(organism, int) and 0 <= organism < len(ORGANISMS):
        return ORGANISMS[organism]
    if organism in ORGANISMS:
        return organism
    raise ValueError(f"unknown organism {organism!r}: use {', '.join(ORGANISMS)} or their index")


class TrackMetadata:
    """Ordered tracks per organism and head: a track's position is its channel index."""

    def __init__(self, tracks: dict[str, dict[str, list[Track]]]):
        for organism in ORGANISMS:
            missing = set(HEADS) - set(tracks.get(organism, {}))
            if missing:
                raise ValueError(f"track metadata for {organism} lacks heads {', '.join(sorted(missing))}")
        self._tracks = {o: {h: tuple(tracks[o][h]) for h in HEADS} for o in ORGANISMS}

    def tracks(self, organism: Organism, head: str) -> tuple[Track, ...]:
        return self._tracks[_organism(organism)][head]

    def columns(self, organism: Organism, head: str) -> dict[str, list[Any]]:
        """Column-oriented tracks: {field: one value per channel}, in `FIELDS` order."""
        tracks = self.tracks(organism, head)
        return {f: [getattr(t, f) for t in tracks] for f in FIELDS}

    def real_track_count(self, organism: Organism, head: str) -> int:
        return sum(not t.padding for t in self.tracks(organism, head))

    def head_tracks(self, organism: Organism, head: str) -> HeadTracks:
        """What the model needs: the padding mask and the data-space scales (1.0 where unknown, as
        the official model uses ones when a head has no nonzero_mean). The official files list every
        channel, padding included (junctions too: 367 tissues for mouse, 277 of them padding)."""
        tracks = self.tracks(organism, head)
        means = [1.0 if math.isnan(t.nonzero_mean) else t.nonzero_mean for t in tracks]
        return HeadTracks(
            padding=np.array([t.padding for t in tracks], dtype=bool),
            nonzero_mean=np.array(means, dtype=np.float32),
        )

    def strand_pairs(self, organism: Organism, head: str) -> np.ndarray:
        """Channel permutation for a reverse-complemented input, as the official model builds it.

        The k-th '+' track swaps with the k-th '-' track; the rest stay. Junction outputs are all
        tissues on '+' then all on '-', so the two halves swap."""
        tracks = self.tracks(organism, head)
        n = len(tracks)
        if HEADS[head].kind == "splice_junction":
            return np.concatenate([np.arange(n, 2 * n), np.arange(n)])
        strands = np.array([t.strand for t in tracks])
        plus, minus = np.flatnonzero(strands == "+"), np.flatnonzero(strands == "-")
        if len(plus) != len(minus):
            raise ValueError(f"{organism} {head}: {len(plus)} '+' but {len(minus)} '-' tracks: cannot pair")
        pairs = np.arange(n)
        pairs[plus], pairs[minus] = minus, plus
        return pairs

    def check_against(self, cfg: ModelConfig) -> None:
        """One-line ValueError unless every head has as many tracks as the config has channels
        (junctions: at most as many tissues)."""
        for organism in ORGANISMS:
            for head in HEADS:
                n, channels = len(self.tracks(organism, head)), cfg.channels(head)
                if n > channels or (n < channels and HEADS[head].kind != "splice_junction"):
                    raise ValueError(
                        f"track metadata does not fit the model: {organism} {head} has {n} tracks, "
                        f"the config {channels} channels"
                    )

    # Serialized column-oriented, leaving out columns that hold only defaults, to keep the JSON small
    # for a safetensors header (1.2 MB for the official metadata). NaN becomes null (standard JSON).
    def to_json(self) -> str:
        doc: dict[str, Any] = {"format": "agpipe-tracks/1"}
        for organism in ORGANISMS:
            doc[organism] = {}
            for head in HEADS:
                cols = self.columns(organism, head)
                if "nonzero_mean" in cols:
                    cols["nonzero_mean"] = [None if math.isnan(v) else v for v in cols["nonzero_mean"]]
                default = {**_DEFAULTS, "nonzero_mean": None}
                doc[organism][head] = {
                    f: vals for f, vals in cols.items() if f == "name" or any(v != default[f] for v in vals)
                }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> TrackMetadata:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"track metadata JSON is malformed: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != "agpipe-tracks/1":
            raise ValueError("track metadata JSON is not in the agpipe-tracks/1 format")
        tracks: dict[str, dict[str, list[Track]]] = {}
        for organism in ORGANISMS:
            if not isinstance(doc.get(organism), dict):
                raise ValueError(f"track metadata JSON has no {organism} heads")
            tracks[organism] = {}
            for head, cols in doc[organism].items():
                if head not in HEADS or not isinstance(cols, dict) or not isinstance(cols.get("name"), list):
                    raise ValueError(f"track metadata JSON: {organism} {head} is no head with names")
                n = len(cols["name"])
                bad = [f for f, v in cols.items() if f not in FIELDS or not isinstance(v, list) or len(v) != n]
                if bad:
                    raise ValueError(f"track metadata JSON: bad {organism} {head} columns {', '.join(bad)}")
                if "nonzero_mean" in cols:
                    cols["nonzero_mean"] = [math.nan if v is None else float(v) for v in cols["nonzero_mean"]]
                tracks[organism][head] = [Track(**{f: vals[i] for f, vals in cols.items()}) for i in range(n)]
        return cls(tracks)


# ---- textproto ---------------------------------------------------------------------------------

Message = dict[str, list[Any]]  # field name -> its values in order: str scalars or nested Messages

_TOKENS = re.compile(
    r"""(?P<skip>[ \t\r\n]+|\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<word>[\w.+-]+)
      | (?P<punct>[{}:;,])
      | (?P<bad>.)""",
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))")
_SIMPLE_ESCAPES = dict(zip("ntrabfv\\'\"?", "\n\t\r\a\b\f\v\\'\"?"))


def _unquote(token: str, line: int) -> str:
    # Octal and hex escapes stand for bytes (text_format writes non-ASCII UTF-8 that way), so the
    # string is rebuilt as bytes and decoded once.
    body = token[1:-1]
    if "\\" not in body:
        return body
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(body):
        out += body[pos : m.start()].encode()
        octal, hexa, char = m.groups()
        if octal or hexa:
            code = int(octal, 8) if octal else int(hexa, 16)
            if code > 255:
                raise ValueError(f"line {line}: escape '\\{octal}' is not a byte")
            out.append(code)
        elif char in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[char].encode()
        else:
            raise ValueError(f"line {line}: unknown escape '\\{char}' in a string")
        pos = m.end()
    out += body[pos:].encode()
    try:
        return out.decode()
    except UnicodeDecodeError:
        raise ValueError(f"line {line}: string is not valid UTF-8") from None


def parse_textproto(text: str) -> Message:
    """Protobuf text format -> nested dicts of lists. Scalars stay as text (strings unquoted):
    their types come from the schema, which only the caller knows."""
    tokens: list[tuple[str, str, int]] = []
    line = 1
    for m in _TOKENS.finditer(text):
        kind, value = m.lastgroup, m.group()
        if kind == "bad":
            what = "unterminated string" if value in "\"'" else f"unexpected character {value!r}"
            raise ValueError(f"line {line}: {what}")
        if kind != "skip":
            tokens.append((kind, value, line))
        line += value.count("\n")

    def block(pos: int, opened_at: int | None) -> tuple[Message, int]:
        fields: Message = {}
        while pos < len(tokens):
            kind, name, line = tokens[pos]
            if (kind, name) == ("punct", "}"):
                if opened_at is None:
                    raise ValueError(f"line {line}: '}}' without a matching '{{'")
                return fields, pos + 1
            if kind != "word" or not name.isidentifier():
                raise ValueError(f"line {line}: expected a field name, found {name!r}")
            pos += 1
            colon = pos < len(tokens) and tokens[pos][:2] == ("punct", ":")
            pos += colon
            if pos == len(tokens):
                raise ValueError(f"line {line}: field {name!r} has no value")
            vkind, value, vline = tokens[pos]
            if (vkind, value) == ("punct", "{"):
                item, pos = block(pos + 1, vline)
            elif colon and vkind in ("string", "word"):
                item, pos = (_unquote(value, vline) if vkind == "string" else value), pos + 1
            else:
                raise ValueError(f"line {vline}: expected a value for {name!r}, found {value!r}")
            fields.setdefault(name, []).append(item)
            if pos < len(tokens) and tokens[pos][0] == "punct" and tokens[pos][1] in ";,":
                pos += 1
        if opened_at is not None:
            raise ValueError(f"line {opened_at}: '{{' is never closed")
        return fields, pos

    return block(0, None)[0]


# ---- the MetadataResponse schema -----------------------------------------------------------------

_TEXT_FIELDS = {  # proto field -> Track field
    "name": "name",
    "assay": "assay",
    "gtex_tissue": "gtex_tissue",
    "data_source": "data_source",
    "transcription_factor_code": "transcription_factor",
    "histone_mark_code": "histone_mark",
}
_TRACK_KEYS = {
    *_TEXT_FIELDS,
    "strand",
    "ontology_term",
    "biosample",
    "endedness",
    "genetically_modified",
    "nonzero_mean",
}
_JUNCTION_KEYS = {"name", "ontology_term", "biosample", "gtex_tissue", "data_source", "assay"}
_STRANDS = {"STRAND_POSITIVE": "+", "STRAND_NEGATIVE": "-", "STRAND_UNSTRANDED": "."}
_ONTOLOGIES = ("CLO", "UBERON", "CL", "EFO", "NTR")
_BIOSAMPLE_TYPES = (
    "UNSPECIFIED",
    "PRIMARY_CELL",
    "IN_VITRO_DIFFERENTIATED_CELLS",
    "CELL_LINE",
    "TISSUE",
    "TECHNICAL_SAMPLE",
    "ORGANOID",
)
_ENDEDNESS = ("UNSPECIFIED", "SINGLE", "PAIRED")
_BOOLS = {"true": True, "True": True, "t": True, "1": True}
_BOOLS |= {"false": False, "False": False, "f": False, "0": False}


def _check_keys(msg: Message, keys: set[str], where: str) -> None:
    unknown = set(msg) - keys
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}")


def _one(msg: Message, key: str, where: str, nested: bool = False) -> Any:
    """The field's single value: text, or a Message when `nested`; None when absent."""
    values = msg.get(key, [])
    if len(values) > 1:
        raise ValueError(f"{where}: field {key!r} given {len(values)} times")
    if values and isinstance(values[0], dict) != nested:
        raise ValueError(f"{where}: field {key!r} must be {'a {...} block' if nested else 'a scalar'}")
    return values[0] if values else None


def _enum(value: str | None, prefix: str, names: tuple[str, ...], where: str) -> str:
    """'PREFIX_NAME' -> 'NAME'; '' when absent."""
    if value is None:
        return ""
    if not value.startswith(prefix) or value.removeprefix(prefix) not in names:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(prefix + n for n in names)}")
    return value.removeprefix(prefix)


def _track(msg: Message, junction: bool, where: str) -> Track:
    keys = _JUNCTION_KEYS if junction else _TRACK_KEYS
    _check_keys(msg, keys, where)
    fields: dict[str, Any] = {f: _one(msg, k, where) or "" for k, f in _TEXT_FIELDS.items() if k in keys}
    if not junction:
        strand = _one(msg, "strand", where)
        if strand is None:  # the official SDK rejects a missing strand too
            raise ValueError(f"{where}: strand is missing")
        if strand not in _STRANDS:
            raise ValueError(f"{where}: strand must be one of {', '.join(_STRANDS)}, not {strand!r}")
        fields["strand"] = _STRANDS[strand]
        fields["endedness"] = _enum(_one(msg, "endedness", where), "ENDEDNESS_", _ENDEDNESS, where).lower()
        if (flag := _one(msg, "genetically_modified", where)) is not None:
            if flag not in _BOOLS:
                raise ValueError(f"{where}: genetically_modified must be true or false, not {flag!r}")
            fields["genetically_modified"] = _BOOLS[flag]
        if (mean := _one(msg, "nonzero_mean", where)) is not None:
            try:
                fields["nonzero_mean"] = float(np.float32(float(mean)))  # a proto float: 32 bits
            except ValueError:
                raise ValueError(f"{where}: nonzero_mean {mean!r} is not a number") from None
    if (term := _one(msg, "ontology_term", where, nested=True)) is not None:
        _check_keys(term, {"ontology_type", "id"}, where)
        kind = _enum(_one(term, "ontology_type", where), "ONTOLOGY_TYPE_", _ONTOLOGIES, where)
        ident = _one(term, "id", where) or "0"
        if not re.fullmatch(r"-?\d+", ident):
            raise ValueError(f"{where}: ontology id {ident!r} is not an integer")
        fields["ontology_curie"] = f"{kind}:{int(ident):07d}"
    if (sample := _one(msg, "biosample", where, nested=True)) is not None:
        _check_keys(sample, {"type", "name", "stage"}, where)
        kind = _one(sample, "type", where) or "BIOSAMPLE_TYPE_UNSPECIFIED"  # the proto3 default
        fields["biosample_type"] = _enum(kind, "BIOSAMPLE_TYPE_", _BIOSAMPLE_TYPES, where).lower()
        fields["biosample_name"] = _one(sample, "name", where) or ""
        fields["biosample_stage"] = _one(sample, "stage", where) or ""
    return Track(**fields)


def _read_response(text: str) -> dict[str, list[Track]]:
    """One organism's MetadataResponse -> {head: tracks}."""
    heads: dict[str, list[Track]] = {}
    response = parse_textproto(text)
    _check_keys(response, {"output_metadata"}, "top level")
    for i, output in enumerate(response.get("output_metadata", [])):
        where = f"output_metadata #{i + 1}"
        if not isinstance(output, dict):
            raise ValueError(f"{where}: must be a {{...}} block")
        _check_keys(output, {"output_type", "tracks", "junctions"}, where)
        head = OUTPUT_TYPES.get(_one(output, "output_type", where))
        if head is None:
            raise ValueError(f"{where}: output_type must be one of {', '.join(OUTPUT_TYPES)}")
        if head in heads:
            raise ValueError(f"{where}: {head} given twice")
        junction = HEADS[head].kind == "splice_junction"
        payload, other = ("junctions", "tracks") if junction else ("tracks", "junctions")
        if other in output:
            raise ValueError(f"{where}: {head} takes a '{payload}' block, not '{other}'")
        block = _one(output, payload, where, nested=True) or {}
        _check_keys(block, {"metadata"}, where)
        entries = block.get("metadata", [])
        if not all(isinstance(m, dict) for m in entries):
            raise ValueError(f"{where}: 'metadata' entries must be {{...}} blocks")
        heads[head] = [_track(m, junction, f"{where} ({head}) track #{k + 1}") for k, m in enumerate(entries)]
    if set(heads) != set(HEADS):
        raise ValueError(f"no metadata for {', '.join(sorted(set(HEADS) - set(heads)))}")
    return heads


def load_metadata(directory: str | os.PathLike) -> TrackMetadata:
    """Reads both organisms' official textproto files from `directory`."""
    tracks = {}
    for organism, file_name in FILES.items():
        path = Path(directory, file_name)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read track metadata {path}: {e.__class__.__name__}") from None
        try:
            tracks[organism] = _read_response(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return TrackMetadata(tracks)


# ---- synthetic metadata ------------------------------------------------------------------------

# Fake but plausible: names like the official ones ("CURIE assay"), under a made-up DEMO ontology so
# they can never be mistaken for real tracks. head -> (assay, data source).
_DEMO_ASSAYS = {
    "atac": ("ATAC-seq", "encode"),
    "dnase": ("DNase-seq", "encode"),
    "procap": ("PRO-cap", "encode"),
    "cage": ("CAGE", "fantom"),
    "rna_seq": ("total RNA-seq", "encode"),
    "chip_tf": ("TF ChIP-seq", "encode"),
    "chip_histone": ("Histone ChIP-seq", "encode"),
    "contact_maps": ("in situ Hi-C", "4dnucleome"),
    "splice_sites_usage": ("total RNA-seq", "encode"),
    "splice_sites_junction": ("total RNA-seq", "encode"),
}
_DEMO_BIOSAMPLES = (  # name, type, stage
    ("T-cell", "primary_cell", "adult"),
    ("K562", "cell_line", "adult"),
    ("liver", "tissue", "embryonic"),
    ("motor neuron", "in_vitro_differentiated_cells", "adult"),
    ("intestinal organoid", "organoid", "unknown"),
    ("HepG2", "cell_line", "child"),
    ("heart left ventricle", "tissue", "adult"),
    ("B cell", "primary_cell", "newborn"),
)
_DEMO_FACTORS = {
    "chip_tf": ("CTCF", "POLR2A", "REST", "YY1", "MAX"),
    "chip_histone": ("H3K4me3", "H3K27ac", "H3K36me3", "H3K27me3", "H3K9me3"),
}
_STRANDED = ("procap", "cage", "rna_seq", "splice_sites_usage")
_GTEX_HEADS = ("rna_seq", "splice_sites_usage", "splice_sites_junction")
_SEQUENCED_HEADS = ("atac", "dnase", "rna_seq", "chip_tf", "chip_histone")  # the ones with an endedness
_SPLICE_SITES = (Track("donor", "+"), Track("acceptor", "+"), Track("donor", "-"), Track("acceptor", "-"))


def _demo_track(rng: random.Random, head: str, strand: str) -> Track:
    assay, source = _DEMO_ASSAYS[head]
    sample, kind, stage = rng.choice(_DEMO_BIOSAMPLES)
    curie = f"DEMO:{rng.randrange(1, 10**5):07d}"
    factor = rng.choice(_DEMO_FACTORS[head]) if head in _DEMO_FACTORS else ""
    prefix = {"splice_sites_usage": "usage_", "splice_sites_junction": "junction_"}.get(head, "")
    gtex_tissue = sample.title() if kind == "tissue" and head in _GTEX_HEADS else ""
    is_track_head = HEADS[head].kind == "tracks"
    return Track(
        name=f"{prefix}{curie} {assay} {factor}".rstrip(),
        strand=strand,
        assay=assay,
        biosample_name=sample,
        biosample_type=kind,
        biosample_stage=stage,
        ontology_curie=curie,
        gtex_tissue=gtex_tissue,
        data_source="gtex" if gtex_tissue else source,
        endedness=rng.choice(("paired", "single")) if head in _SEQUENCED_HEADS else "",
        genetically_modified=False if is_track_head else None,
        transcription_factor=factor if head == "chip_tf" else "",
        histone_mark=factor if head == "chip_histone" else "",
        # Spread log-uniformly over 0.05..20, rounded to float32 as the official values are.
        nonzero_mean=float(np.float32(0.05 * 400 ** rng.random())) if is_track_head else math.nan,
    )


def synthetic_metadata(cfg: ModelConfig) -> TrackMetadata:
    """Deterministic, plausible metadata shaped like the official one, for any config: padding
    after the real tracks, '+' tracks then their '-' partners on stranded heads, fewer mouse tracks
    and none at all for mouse PRO-cap."""
    tracks: dict[str, dict[str, list[Track]]] = {}
    for organism in ORGANISMS:
        tracks[organism] = {}
        for head in HEADS:
            rng = random.Random(f"{organism}/{head}")  # str seeds are stable across runs
            n = cfg.channels(head)
            if head == "splice_sites_classification":
                real = list(_SPLICE_SITES[:n])
            else:
                if organism == "human":
                    count = n - max(1, n // 10) if n >= 4 else n  # a few padding tracks at the end
                elif head == "procap":
                    count = 0  # as official: mouse has no PRO-cap tracks, only padding
                else:
                    count = max(1, n // 4)
                pairs = count // 3 if head in _STRANDED else 0
                stranded = [_demo_track(rng, head, "+") for _ in range(pairs)]
                strand = "" if HEADS[head].kind == "splice_junction" else "."
                real = [
                    *stranded,
                    *(dataclasses.replace(t, strand="-") for t in stranded),
                    *(_demo_track(rng, head, strand) for _ in range(count - 2 * pairs)),
                ]
            padding = Track("Padding", "" if HEADS[head].kind == "splice_junction" else ".")
            tracks[organism][head] = real + [padding] * (n - len(real))
    return TrackMetadata(tracks)
