"""What keeps ``optimize``'s memory near one copy of the model (the large-model bench measures the whole):
weights read in place release their pages, large statistics live in a scratch file, later calibration
passes replay the recorded block inputs, the big new initializers are computed while the model is
written, and verification runs one model at a time against the written file."""

from __future__ import annotations

import gc
import importlib.util
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import tardis_compile as tc
from tardis_compile import calibrate, histogram, modelio
from tardis_compile.passes.ffn_match import find_blocks

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")


def _rss_file() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def _external_model(folder: Path, layers: int = 2, d: int = 512, hidden: int = 4096) -> Path:
    spec = importlib.util.spec_from_file_location("large_model_bench", REPO / "bench" / "large_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = folder / "model.onnx"
    bench.build(path, layers=layers, d=d, D=hidden)
    return path


def _feeds(d: int, n: int, seed: int = 0, rows: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, d)).astype(np.float32)} for _ in range(n)]


def test_drop_pages_releases_weights_read_in_place(tmp_path):
    model = modelio.load(_external_model(tmp_path))
    block = find_blocks(model)[0][0]
    w1 = block.w1()  # 512 × 4096 float32 = 8 MB, memory-mapped
    before = _rss_file()
    total = float(w1.sum(dtype=np.float64))
    touched = _rss_file() - before
    assert touched >= 7 * MB
    modelio.drop_pages(w1)
    assert _rss_file() <= before + MB
    assert float(w1.sum(dtype=np.float64)) == total  # still valid: mapped again on access
    in_memory = np.arange(10.0)
    modelio.drop_pages(in_memory, in_memory.T, ir.Tensor(in_memory))  # not file-backed: left alone
    assert in_memory.tolist() == list(range(10))


def test_large_statistics_live_in_a_scratch_file(tmp_path, monkeypatch):
    monkeypatch.setattr(histogram, "SPILL_BYTES", 4 * MB)
    rng = np.random.default_rng(0)
    h = [rng.standard_normal((100, 512)) * 2.0 for _ in range(3)]
    x = [rng.standard_normal((100, 64)) for _ in range(3)]
    small = histogram.NeuronStats.empty(128, "none", inputs=64)
    big = histogram.NeuronStats.empty(512, "none", inputs=64)  # 6 × 512 × 512 × 8 B = 12.6 MB
    from_arrays = histogram.NeuronStats(big.variant, big.grid, np.zeros(big.moments.shape), np.zeros((65, 65)))
    assert not small.spilled and big.spilled and from_arrays.spilled
    monkeypatch.setattr(histogram, "SPILL_BYTES", 1 << 40)
    ref = histogram.NeuronStats.empty(512, "none", inputs=64)  # the same, in memory
    assert not ref.spilled
    before = _rss_file()
    for hb, xb in zip(h, x):
        big.add(hb)
        big.add_inputs(xb)
        ref.add(hb)
        ref.add_inputs(xb)
    assert _rss_file() - before >= 10 * MB  # the moments' pages are resident while they are worked on
    big.release()
    assert _rss_file() - before <= MB
    np.testing.assert_array_equal(big.moments, ref.moments)
    np.testing.assert_array_equal(big.gram, ref.gram)
    np.testing.assert_array_equal(big.prefix(), ref.prefix())
    assert big.tokens == 300 and isinstance(big.tokens, int)
    assert type(big.input_moments()) is np.ndarray
    histogram.save({"b": big}, tmp_path / "stats.npz")
    monkeypatch.setattr(histogram, "SPILL_BYTES", 4 * MB)
    loaded = histogram.load(tmp_path / "stats.npz")["b"]
    assert loaded.spilled
    np.testing.assert_array_equal(loaded.moments, ref.moments)
    np.testing.assert_array_equal(loaded.gram, ref.gram)


def test_later_passes_replay_the_recorded_inputs(tmp_path, monkeypatch):
    model = modelio.load(_external_model(tmp_path, layers=2, d=64, hidden=256))
    blocks = find_blocks(model)[0]
    feeds = _feeds(64, 4)
    source = lambda: iter(feeds)  # noqa: E731
    first = list(calibrate.stream_block_inputs(model, blocks, source, what="t", record=True))
    key = calibrate._recording_key(model, blocks, source, None)
    folder = calibrate._RECORDINGS[key][2].folder
    assert folder.is_dir() and sum(f.stat().st_size for f in folder.iterdir()) == 2 * 4 * 64 * 64 * 4

    def no_model(*args, **kwargs):
        raise AssertionError("the model ran again")

    monkeypatch.setattr(calibrate, "_run_blocks", no_model)
    again = list(calibrate.stream_block_inputs(model, blocks, source, what="t"))
    assert len(again) == len(first) == 4
    for a, b in zip(first, again):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(AssertionError, match="ran again"):  # another source is not a replay
        list(calibrate.stream_block_inputs(model, blocks, lambda: iter(feeds), what="t"))
    del source, first, again
    gc.collect()
    assert key not in calibrate._RECORDINGS and not folder.exists()  # gone with its source

    monkeypatch.undo()
    source = lambda: iter(feeds)  # noqa: E731
    list(calibrate.stream_block_inputs(model, blocks, source, what="t", record=True))
    key = calibrate._recording_key(model, blocks, source, None)
    folder = calibrate._RECORDINGS[key][2].folder
    del model, blocks
    gc.collect()
    assert key not in calibrate._RECORDINGS and not folder.exists()  # or with its model, the source alive


def test_an_unfinished_pass_leaves_no_recording(tmp_path, monkeypatch):
    model = modelio.load(_external_model(tmp_path, layers=1, d=64, hidden=256))
    blocks = find_blocks(model)[0]
    feeds = _feeds(64, 4)
    source = lambda: iter(feeds)  # noqa: E731
    made = []
    real = calibrate._Recording

    def recording(blocks):
        made.append(real(blocks))
        return made[-1]

    monkeypatch.setattr(calibrate, "_Recording", recording)
    stream = calibrate.stream_block_inputs(model, blocks, source, what="t", record=True)
    next(stream)
    stream.close()
    assert len(made) == 1 and not made[0].folder.exists()
    assert calibrate._recorded(model, blocks, source, None) is None


def test_a_recording_of_padding_only_batches_replays_empty_rows(tmp_path):
    model = modelio.load(_external_model(tmp_path, layers=1, d=64, hidden=256))
    blocks = find_blocks(model)[0]
    recording = calibrate._Recording(blocks)
    for _ in range(2):
        assert recording.add({blocks[0].name: np.zeros((0, 64), np.float32)})
    recording.finish()
    replayed = list(recording.replay(None))
    recording.close()
    assert [b[blocks[0].name].shape for b in replayed] == [(0, 64), (0, 64)]
    assert not recording.folder.exists()


def test_verification_runs_one_model_at_a_time(tmp_path, monkeypatch):
    src = _external_model(tmp_path, layers=2, d=64, hidden=256)
    out = tmp_path / "out.onnx"
    tc.optimize(src, out, _feeds(64, 6), show_progress=False)
    live: weakref.WeakSet = weakref.WeakSet()
    most = []
    real = ort.InferenceSession

    class Counted(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)
            most.append(len(live))

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    result = tc.verify(src, out, _feeds(64, 3, seed=5))
    assert result.batches == 3 and len(result.blocks) == 2
    assert len(most) == 2 and max(most) == 1  # the original's session is gone before the optimized one


def test_new_weights_are_written_lazily_and_verified_from_the_file(tmp_path, monkeypatch):
    src = _external_model(tmp_path, layers=2, d=64, hidden=256)
    seen = {}
    real_save = modelio.save

    def save(model, dst, *, external_data=None, validate=None):
        seen["before"] = {name: type(v.const_value) for name, v in model.graph.initializers.items()}

        def check(path):
            seen["during"] = {name: v.const_value for name, v in model.graph.initializers.items()}
            validate(path)

        return real_save(model, dst, external_data=external_data, validate=check)

    monkeypatch.setattr(modelio, "save", save)
    tc.optimize(src, tmp_path / "out.onnx", _feeds(64, 6), show_progress=False)
    big = [n for n in seen["before"] if n.rsplit("/", 1)[-1] in ("W_f", "W1t", "W2")]
    assert len(big) == 6
    assert all(seen["before"][n] is ir.LazyTensor for n in big)
    during = seen["during"]
    assert all(isinstance(t, ir.ExternalTensor) and Path(t.path).parent != tmp_path for n, t in during.items()
               if t.nbytes > 256)
    assert len({Path(t.path).parent for t in during.values() if isinstance(t, ir.ExternalTensor)}) == 1
    after = ir.load(tmp_path / "out.onnx")  # and what was written is what was deferred
    w1 = find_blocks(modelio.load(src))[0][0].w1()
    np.testing.assert_array_equal(after.graph.initializers["tardis/ffn0/W1t"].const_value.numpy(), w1.T)
