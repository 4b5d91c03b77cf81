"""The worker's cropping and the writer's sub-spans, without Ray: writing what the worker keeps gives
the same files as writing the model's full outputs with parquet.write_window."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from agpipe.io.fasta import open_genome, one_hot
from agpipe.io.parquet import CONTACT_MAPS, JUNCTIONS, Junctions, kept_rows, write_window
from agpipe.jobs.plan import plan_windows
from agpipe.jobs.windows import CODE_ONE_HOT, EncodedWindow, SkippedWindow, WindowPrediction, encode_window
from agpipe.jobs.worker import ModelWorker, kept_outputs
from agpipe.jobs.writer import output_columns, write_prediction
from agpipe.model.checkpoint import load_weights
from agpipe.model.config import ALL_OUTPUTS, DEFAULT_OUTPUTS
from agpipe.model.precision import FLOAT32
from agpipe.model.weights import demo_weights, load_model

WINDOW = 8192
CROP = 1152  # a multiple of 128 but not of 2048: contact-map bins do not start at the kept span


@pytest.fixture(scope="module")
def genome(small_genome):
    with open_genome(small_genome) as g:
        yield g


@pytest.fixture(scope="module")
def all_outputs_model():
    model, metadata = load_model(load_weights(demo_weights()), 0, ALL_OUTPUTS, FLOAT32, "cpu")
    columns, _ = output_columns(metadata, "human", ALL_OUTPUTS)
    return model, columns


def test_encoded_windows_are_the_one_hot_input(genome):
    windows = list(plan_windows(genome.contigs, WINDOW, CROP))
    for w in windows:
        encoded = encode_window(genome, w)
        sequence = genome.fetch(w.chrom, w.start, w.end)
        if isinstance(encoded, SkippedWindow):
            assert not sequence[w.out_start - w.start : w.out_end - w.start].strip(b"N")
            continue
        assert encoded.codes.dtype == np.uint8 and encoded.codes.shape == (WINDOW,)
        np.testing.assert_array_equal(CODE_ONE_HOT[encoded.codes], one_hot(sequence))
    assert any(isinstance(encode_window(genome, w), SkippedWindow) for w in windows)


def test_kept_outputs_write_what_the_full_outputs_write(tmp_path, genome, all_outputs_model):
    model, columns = all_outputs_model
    lengths = dict(genome.contigs)
    chr1 = [w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr1"]
    chr_m = [w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chrM"]
    junction_rows = 0
    for w in (chr1[0], chr1[-1], *chr_m):  # first window, a last one cut by the contig end, one past both ends
        x = torch.from_numpy(one_hot(genome.fetch(w.chrom, w.start, w.end)))[None]
        with torch.inference_mode():
            out = model(x)
        full = {o: v[0].numpy() for o, v in out.items() if o not in (JUNCTIONS, CONTACT_MAPS)}
        junctions = Junctions(out[JUNCTIONS].positions[0].numpy(), out[JUNCTIONS].counts[0].numpy())
        expected = write_window(tmp_path / "full", w, lengths[w.chrom], full, columns, junctions, out[CONTACT_MAPS][0].numpy())

        prediction = kept_outputs(out, 0, w)
        assert prediction.nonfinite_count == 0
        written = write_prediction(tmp_path / "kept", prediction, lengths[w.chrom], columns, "flag")

        assert written.record.status == "done"
        assert sorted(p.path for p in written.record.parts) == sorted(p.path for p in expected)
        for part in expected:
            assert pq.read_table(tmp_path / "kept" / part.path).equals(pq.read_table(tmp_path / "full" / part.path)), part.path
            if part.path.startswith("junctions/"):
                junction_rows += part.rows
    assert junction_rows > 0  # the comparison covered real junctions


def test_model_worker_predicts_each_window_of_a_batch(genome):
    """The worker class itself (as the Ray actor runs it): a batch with a skipped window in it."""
    windows = [w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr1"][1:4]
    batch = [encode_window(genome, w) for w in windows]
    assert [type(b) for b in batch] == [EncodedWindow, SkippedWindow, EncodedWindow]
    weights = demo_weights()
    worker = ModelWorker(str(weights), load_weights(weights).sha256, "human", ALL_OUTPUTS[:2], "float32", "cpu", False, 3, WINDOW, 1)
    results = worker.predict(*batch)
    assert isinstance(results[1], SkippedWindow)
    for w, result in zip(windows[::2], results[::2]):
        single = worker.predict(encode_window(genome, w))
        assert isinstance(single, WindowPrediction) and result.window == w
        for output, values in result.tracks.items():
            assert values.shape[0] == len(kept_rows(w, output.resolution))
            np.testing.assert_allclose(values, single.tracks[output], rtol=1e-5, atol=1e-6)


def test_compiled_worker_predicts_what_the_eager_one_does(genome):
    """torch.compile (the GPU default) on the CPU: same predictions, short batches padded."""
    windows = [w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr2"][:3]
    batch = [encode_window(genome, w) for w in windows]
    weights = demo_weights()
    sha256 = load_weights(weights).sha256
    outputs = (ALL_OUTPUTS[1], CONTACT_MAPS)  # atac:128 and the pair path
    eager = ModelWorker(str(weights), sha256, "human", outputs, "float32", "cpu", False, 2, WINDOW)
    compiled = ModelWorker(str(weights), sha256, "human", outputs, "float32", "cpu", True, 2, WINDOW)
    for expected, got in zip(eager.predict(*batch[:2]) + [eager.predict(batch[2])], compiled.predict(*batch[:2]) + [compiled.predict(batch[2])]):
        np.testing.assert_allclose(got.tracks[ALL_OUTPUTS[1]], expected.tracks[ALL_OUTPUTS[1]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.contact_maps, expected.contact_maps, rtol=1e-4, atol=1e-5)


def test_worker_computes_heads_only_over_the_kept_spans(genome):
    """With the run's crop, per-position heads run over [crop, window - crop) only: same values."""
    weights = demo_weights()
    sha256 = load_weights(weights).sha256
    outputs = ALL_OUTPUTS
    windows = [w for w in plan_windows(genome.contigs, WINDOW, CROP)][:3]
    full = ModelWorker(str(weights), sha256, "human", outputs, "float32", "cpu", False, 1, WINDOW)
    cropped = ModelWorker(str(weights), sha256, "human", outputs, "float32", "cpu", False, 1, WINDOW, crop=CROP)
    for w in windows:
        encoded = encode_window(genome, w)
        if isinstance(encoded, SkippedWindow):
            continue
        expected, got = full.predict(encoded), cropped.predict(encoded)
        assert set(got.tracks) == set(expected.tracks)
        for output in expected.tracks:
            np.testing.assert_allclose(got.tracks[output], expected.tracks[output], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.contact_maps, expected.contact_maps, rtol=1e-5, atol=1e-6)


def test_bfloat16_tracks_cross_to_the_host_as_bits_and_come_back_exact(tmp_path, genome):
    """bf16 outputs travel as uint16 bit patterns (half the bytes); what is written is exactly the
    model's bf16 values as float32, and a NaN among them is still counted."""
    w = next(w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr1")
    output = ALL_OUTPUTS[1]
    bins = WINDOW // output.resolution
    values = torch.randn(1, bins, 5, generator=torch.Generator().manual_seed(0)).mul(300).to(torch.bfloat16)
    values[0, kept_rows(w, output.resolution).start, 2] = float("nan")
    prediction = kept_outputs({output: values}, 0, w)
    assert prediction.tracks[output].dtype == np.uint16 and prediction.nonfinite_count == 1
    rows = kept_rows(w, output.resolution)
    expected = values[0, rows.start : rows.stop].float().numpy()
    np.testing.assert_array_equal(prediction.values(output), expected)  # NaN == NaN here
    columns = {output: [f"t{i}" for i in range(5)]}
    written = write_prediction(tmp_path, prediction, dict(genome.contigs)[w.chrom], columns, "flag")
    table = pq.read_table(tmp_path / written.record.parts[0].path)
    np.testing.assert_array_equal(np.stack([table[c].to_numpy() for c in columns[output]], axis=1), expected)


def test_calls_at_once_run_in_the_one_model_thread_and_predict_what_calls_in_turn_do(genome):
    """Ray hands a worker several calls at once (max_concurrency): each call's batch runs in the
    worker's model thread, and each call gets its own windows' predictions, as one call at a time."""
    windows = [w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr2"][:6]
    encoded = [e for e in (encode_window(genome, w) for w in windows) if isinstance(e, EncodedWindow)]
    assert len(encoded) >= 4
    weights = demo_weights()
    worker = ModelWorker(str(weights), load_weights(weights).sha256, "human", ALL_OUTPUTS[:2], "float32", "cpu", False, 1, WINDOW, 1)
    in_turn = [worker.predict(e) for e in encoded]
    model_threads = set()
    forward = worker._forward

    def recording_forward(*args):
        model_threads.add(threading.current_thread().name)
        return forward(*args)

    worker._forward = recording_forward
    with ThreadPoolExecutor(len(encoded)) as calls:
        at_once = list(calls.map(worker.predict, encoded))
    assert model_threads == {"model"}
    for expected, got in zip(in_turn, at_once):
        assert got.window == expected.window and got.nonfinite_count == 0 and got.compute_seconds > 0
        for output, values in expected.tracks.items():
            np.testing.assert_array_equal(got.tracks[output], values)


def test_a_failing_batch_fails_its_call_and_not_the_worker(genome):
    """An error in the model thread (here: codes of the wrong length) is raised by the call that
    sent the batch; the model thread goes on with the next one."""
    w = next(w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr1")
    encoded = encode_window(genome, w)
    weights = demo_weights()
    worker = ModelWorker(str(weights), load_weights(weights).sha256, "human", ALL_OUTPUTS[:1], "float32", "cpu", False, 1, WINDOW, 1)
    with pytest.raises(RuntimeError):
        worker.predict(EncodedWindow(w, encoded.codes[:1000], 0.0))
    assert worker.predict(encoded).window == w


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_a_gpu_worker_enqueues_its_batches_without_waiting_for_the_device(genome):
    """As the pipeline runs it (bf16, compiled with CUDA graphs): from a batch's codes to its copies
    to the host nothing waits for the device (torch's sync debug mode raises on any such wait), so
    the model thread enqueues batch k+1 while the device runs batch k; and the batches queued so
    predict what one batch at a time does."""
    windows = [w for w in plan_windows(genome.contigs, WINDOW, CROP) if w.chrom == "chr2"][:4]
    encoded = [e for e in (encode_window(genome, w) for w in windows) if isinstance(e, EncodedWindow)][:2]
    weights = demo_weights()
    worker = ModelWorker(str(weights), load_weights(weights).sha256, "human", DEFAULT_OUTPUTS, "bfloat16", "cuda", True, 1, WINDOW, crop=CROP)
    one_at_a_time = [worker.predict(e) for e in encoded]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copies = [worker._launch(e.codes[None], [e.window]) for e in encoded for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    queued = [c.wait()[0][0] for c in copies]
    for expected, got in zip([p for p in one_at_a_time for _ in range(2)], queued):
        assert got.window == expected.window and got.nonfinite_count == 0
        for output, values in expected.tracks.items():
            np.testing.assert_array_equal(got.tracks[output], values)


def test_a_worker_refuses_weights_changed_after_the_driver_hashed_them(tmp_path, monkeypatch):
    """The driver's digest is remembered by the file's stat, so workers skip hashing it again; a
    file changed since (same size, same inode) is still caught."""
    from agpipe.model import checkpoint
    from agpipe.model.checkpoint import file_sha256
    from agpipe.model.weights import WeightsError, sha256_memo

    monkeypatch.setattr(checkpoint, "MEMO_SETTLED_SECONDS", -1.0)
    path = tmp_path / "w.safetensors"
    path.write_bytes(demo_weights().read_bytes())
    digest = file_sha256(path, sha256_memo())  # as the driver does
    ModelWorker(str(path), digest, "human", ALL_OUTPUTS[:1], "float32", "cpu", False, 1, WINDOW, 1)  # accepted
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # a weight's last byte
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="changed after the run started"):
        ModelWorker(str(path), digest, "human", ALL_OUTPUTS[:1], "float32", "cpu", False, 1, WINDOW, 1)
