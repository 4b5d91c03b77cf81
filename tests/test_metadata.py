import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agpipe.model.config import HEADS, OFFICIAL, ORGANISMS, SMALL, ModelConfig
from agpipe.model.metadata import (
    FIELDS,
    FILES,
    OUTPUT_TYPES,
    Track,
    TrackMetadata,
    load_metadata,
    parse_textproto,
    synthetic_metadata,
)

# The official files are DeepMind's data: present on dev machines, absent in CI.
REFERENCE = Path(os.environ.get("AGPIPE_REFERENCE_METADATA", "/work/shared/reference/metadata"))

# Real (non-padding) tracks per head, human and mouse, from ALPHAGENOME.md.
REAL_TRACKS = {
    "atac": (167, 18),
    "dnase": (305, 67),
    "procap": (12, 0),
    "cage": (546, 188),
    "rna_seq": (667, 173),
    "chip_tf": (1617, 127),
    "chip_histone": (1116, 183),
    "splice_sites_classification": (4, 4),
    "splice_sites_usage": (734, 180),
    "splice_sites_junction": (367, 90),
    "contact_maps": (28, 8),
}


@pytest.fixture(scope="module")
def official() -> TrackMetadata:
    if not all((REFERENCE / name).exists() for name in FILES.values()):
        pytest.skip(f"official track metadata not in {REFERENCE}")
    return load_metadata(REFERENCE)


def same_tracks(a: TrackMetadata, b: TrackMetadata) -> bool:
    """Field-by-field equality, NaN equal to NaN."""
    for organism in ORGANISMS:
        for head in HEADS:
            for x, y in zip(a.tracks(organism, head), b.tracks(organism, head), strict=True):
                for f in FIELDS:
                    u, v = getattr(x, f), getattr(y, f)
                    if not (u == v or (f == "nonzero_mean" and math.isnan(u) and math.isnan(v))):
                        return False
    return True


def assert_involution(meta: TrackMetadata, organism: str, head: str) -> None:
    pairs = meta.strand_pairs(organism, head)
    assert (pairs[pairs] == np.arange(len(pairs))).all()
    if HEADS[head].kind == "splice_junction":
        return
    flip = {"+": "-", "-": "+"}
    strands = [t.strand for t in meta.tracks(organism, head)]
    assert [strands[j] for j in pairs] == [flip.get(s, s) for s in strands]


# ---- official files ---------------------------------------------------------------------------


def test_official_real_track_counts(official):
    for head, counts in REAL_TRACKS.items():
        assert tuple(official.real_track_count(o, head) for o in ORGANISMS) == counts, head
    official.check_against(OFFICIAL)
    with pytest.raises(ValueError, match="human atac has 256 tracks, the config 6 channels"):
        official.check_against(SMALL)


def test_official_fields(official):
    first = official.tracks("human", "atac")[0]
    assert first == Track(
        name="CL:0000084 ATAC-seq",
        strand=".",
        assay="ATAC-seq",
        biosample_name="T-cell",
        biosample_type="primary_cell",
        biosample_stage="adult",
        ontology_curie="CL:0000084",
        data_source="encode",
        endedness="paired",
        genetically_modified=False,
        nonzero_mean=float(np.float32(0.73974097)),
    )
    tf = official.tracks("human", "chip_tf")[0]
    assert (tf.name, tf.transcription_factor, tf.histone_mark) == ("CL:0000062 TF ChIP-seq CTCF", "CTCF", "")
    procap = official.tracks("human", "procap")[0]
    assert (procap.ontology_curie, procap.strand, procap.biosample_type) == ("EFO:0002106", "+", "cell_line")
    sites = official.tracks("mouse", "splice_sites_classification")
    assert [(t.name, t.strand) for t in sites] == [
        ("donor", "+"),
        ("acceptor", "+"),
        ("donor", "-"),
        ("acceptor", "-"),
        ("Padding", "."),
    ]
    junction = official.tracks("human", "splice_sites_junction")[0]
    assert junction.name.startswith("junction_") and junction.strand == "" and junction.gtex_tissue == ""
    names = {t.biosample_name for t in official.tracks("human", "cage")}
    assert "mesenchymal stem cell of Wharton's jelly" in names  # an escaped quote in the file


def test_official_head_tracks(official):
    for organism in ORGANISMS:
        for head in HEADS:
            tracks = official.head_tracks(organism, head)
            assert tracks.padding.dtype == bool and tracks.nonzero_mean.dtype == np.float32
            assert len(tracks.padding) == len(tracks.nonzero_mean) == OFFICIAL.channels(head)
            assert np.isfinite(tracks.nonzero_mean).all()
            assert_involution(official, organism, head)
    procap = official.head_tracks("mouse", "procap")
    assert procap.padding.all() and (procap.nonzero_mean == 1).all()
    junction = official.head_tracks("mouse", "splice_sites_junction")
    assert not junction.padding[:90].any() and junction.padding[90:].all()
    cage = official.strand_pairs("human", "cage")
    assert official.tracks("human", "cage")[cage[0]].strand == "-"


def test_official_json_round_trip(official):
    text = official.to_json()
    assert len(text) < 2_000_000  # it rides in the safetensors header
    again = TrackMetadata.from_json(text)
    assert same_tracks(official, again) and again.to_json() == text


# ---- synthetic metadata -----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [SMALL, OFFICIAL], ids=["small", "official"])
def test_synthetic_matches_config(cfg: ModelConfig):
    meta = synthetic_metadata(cfg)
    meta.check_against(cfg)
    for organism in ORGANISMS:
        for head in HEADS:
            tracks = meta.tracks(organism, head)
            assert len(tracks) == cfg.channels(head)
            padding = meta.head_tracks(organism, head).padding
            real = meta.real_track_count(organism, head)
            assert not padding[:real].any() and padding[real:].all()  # padding comes last
            assert_involution(meta, organism, head)
            if HEADS[head].kind == "tracks" and real:
                means = [t.nonzero_mean for t in tracks[:real]]
                assert all(0.05 <= m <= 20 for m in means)
                assert all(t.name.startswith("DEMO:") and t.biosample_name for t in tracks[:real])
        assert [t.name for t in meta.tracks(organism, "splice_sites_classification")] == [
            "donor",
            "acceptor",
            "donor",
            "acceptor",
            "Padding",
        ]
    human_tracks = [meta.real_track_count("human", h) for h in HEADS]
    mouse_tracks = [meta.real_track_count("mouse", h) for h in HEADS]
    assert meta.real_track_count("mouse", "procap") == 0
    assert mouse_tracks[-1] < human_tracks[-1]  # splice junction tissues
    assert all(m <= h for m, h in zip(mouse_tracks, human_tracks))
    for head in ("cage", "rna_seq", "procap", "splice_sites_usage"):
        assert {t.strand for t in meta.tracks("human", head)} >= {"+", "-", "."}, head
    if max(dict(cfg.head_channels).values()) >= 4:
        assert any(meta.tracks("human", h)[-1].padding for h in HEADS)
    assert len({t.biosample_name for h in HEADS for t in meta.tracks("human", h)}) >= 4


def test_synthetic_is_deterministic():
    assert synthetic_metadata(SMALL).to_json() == synthetic_metadata(SMALL).to_json()


# ---- JSON -------------------------------------------------------------------------------------


def test_json_round_trip_is_exact():
    meta = synthetic_metadata(SMALL)
    text = meta.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    again = TrackMetadata.from_json(text)
    assert same_tracks(meta, again) and again.to_json() == text
    assert math.isnan(again.tracks("human", "contact_maps")[0].nonzero_mean)
    assert again.tracks("human", "splice_sites_junction")[0].genetically_modified is None


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "other"}', '{"format": "agpipe-tracks/1"}'])
def test_bad_json(text: str):
    with pytest.raises(ValueError) as e:
        TrackMetadata.from_json(text)
    assert "\n" not in str(e.value)


def test_bad_json_columns():
    doc = json.loads(synthetic_metadata(SMALL).to_json())
    doc["mouse"]["atac"]["strand"].pop()
    with pytest.raises(ValueError, match="bad mouse atac columns strand"):
        TrackMetadata.from_json(json.dumps(doc))


# ---- strand pairs -----------------------------------------------------------------------------


@given(st.lists(st.sampled_from("+-."), max_size=40))
def test_strand_pairs_are_an_involution(strands: list[str]):
    strands += ["-" if s == "+" else "+" for s in strands if s != "."]  # as many '-' as '+'
    base = synthetic_metadata(SMALL)
    tracks = {o: {h: list(base.tracks(o, h)) for h in HEADS} for o in ORGANISMS}
    tracks["human"]["cage"] = [Track(f"t{i}", s) for i, s in enumerate(strands)]
    assert_involution(TrackMetadata(tracks), "human", "cage")


def test_unpaired_strands_are_refused():
    base = synthetic_metadata(SMALL)
    tracks = {o: {h: list(base.tracks(o, h)) for h in HEADS} for o in ORGANISMS}
    tracks["human"]["cage"] = [Track("a", "+"), Track("b", "+"), Track("c", "-")]
    with pytest.raises(ValueError, match="2 '\\+' but 1 '-' tracks"):
        TrackMetadata(tracks).strand_pairs(0, "cage")


# ---- textproto --------------------------------------------------------------------------------


def test_textproto_reader():
    text = """
        # a comment
        a: 1; b: "x\\'y" c { d: E_F, d: 'caf\\303\\251' }
        c: { }
    """
    assert parse_textproto(text) == {"a": ["1"], "b": ["x'y"], "c": [{"d": ["E_F", "café"]}, {}]}


def minimal_response(organism: str) -> str:
    """A valid MetadataResponse with one track per head (two for mouse, one of them padding)."""
    blocks = []
    for output_type, head in OUTPUT_TYPES.items():
        payload = "junctions" if head == "splice_sites_junction" else "tracks"
        strand = "" if payload == "junctions" else "strand: STRAND_UNSTRANDED"
        entry = f'metadata {{ name: "{head} track" {strand} }}'
        if organism == "mouse":
            entry += f' metadata {{ name: "padding" {strand} }}'
        blocks.append(f"output_metadata {{ output_type: {output_type} {payload} {{ {entry} }} }}")
    return "\n".join(blocks)


def write_files(directory: Path, human: str, mouse: str) -> None:
    (directory / FILES["human"]).write_text(human)
    (directory / FILES["mouse"]).write_text(mouse)


def test_minimal_files(tmp_path: Path):
    write_files(tmp_path, minimal_response("human"), minimal_response("mouse"))
    meta = load_metadata(tmp_path)
    assert meta.tracks("human", "atac") == (Track("atac track", "."),)
    assert [t.padding for t in meta.tracks(1, "splice_sites_junction")] == [False, True]
    with pytest.raises(ValueError, match="human atac has 1 tracks, the config 6 channels"):
        meta.check_against(SMALL)


GOOD = minimal_response("human")
MALFORMED = {
    "unclosed brace": (GOOD + "\noutput_metadata {", "line 12: '{' is never closed"),
    "stray brace": (GOOD + "\n}", "line 12: '}' without a matching '{'"),
    "unterminated string": (GOOD.replace('"atac track"', '"atac track'), "line 1: unterminated string"),
    "scalar without colon": (GOOD.replace('name: "atac', 'name "atac'), "expected a value for 'name'"),
    "bad character": (GOOD + "\n@", "line 12: unexpected character '@'"),
    "bad escape": (GOOD.replace("atac track", "atac\\q"), "unknown escape '\\\\q'"),
    "unknown field": (GOOD.replace("name:", "nmae:", 1), "#1 \\(atac\\) track #1: unknown field 'nmae'"),
    "no strand": (GOOD.replace(" strand: STRAND_UNSTRANDED", "", 1), "strand is missing"),
    "bad enum": (GOOD.replace("STRAND_UNSTRANDED", "STRAND_SIDEWAYS", 1), "'STRAND_SIDEWAYS'"),
    "bad number": (GOOD.replace("strand:", "nonzero_mean: abc strand:", 1), "nonzero_mean 'abc' is not a"),
    "repeated head": (GOOD + "\n" + GOOD.splitlines()[0], "output_metadata #12: atac given twice"),
    "missing head": ("\n".join(GOOD.splitlines()[1:]), "no metadata for atac"),
    "junction strand": (
        GOOD.replace('junction track"', 'junction track" strand: STRAND_POSITIVE'),
        "\\(splice_sites_junction\\) track #1: unknown field 'strand'",
    ),
    "repeated scalar": (GOOD.replace("name:", 'name: "x" name:', 1), "field 'name' given 2 times"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_textproto(tmp_path: Path, case: str):
    text, message = MALFORMED[case]
    write_files(tmp_path, text, minimal_response("mouse"))
    with pytest.raises(ValueError, match=message) as e:
        load_metadata(tmp_path)
    assert "\n" not in str(e.value) and FILES["human"] in str(e.value)


def test_missing_file(tmp_path: Path):
    (tmp_path / FILES["human"]).write_text(minimal_response("human"))
    with pytest.raises(ValueError, match=f"cannot read track metadata .*{FILES['mouse']}"):
        load_metadata(tmp_path)
