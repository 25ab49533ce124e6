"""Large-model bench: build a synthetic FFN model above protobuf's 2 GB limit (external data), then
calibrate + rewrite + verify it end to end, and measure time and peak memory.

    .venv/bin/python bench/large_model.py [--layers 17 --d 2048 --D 8192] [--batches 10 --rows 256]
        [--predictor exact] [--out /tmp/tardis-large] [--json bench/results/large_model.json]

The model is ``layers`` residual blocks ``x ← x + GELU(x·W1 + b1)·W2 + b2`` (float32, W1 ~ N(0, 1/d)).
It is written without ever holding it in memory: the external data file is filled block by block with
NumPy and the graph refers to it by offset. ``tardis-compile optimize`` (default settings) then runs in a
child process whose peak RSS (``ru_maxrss``) is reported against the weight size, with the RSS sampled
every 0.2 s and attributed to the step the child's progress lines name; results go to
``bench/results/large_model.json``.

What remains of the peak (2.28 GB model, 17 × 2048/8192, int4 predictor: 4.72 GB = 2.07× the weights)
comes during verification, when ONNX Runtime runs the *optimized* model: ≈1.2× the weights — the pages
of the folded W_f, the int4 predictor and the W2 the fallback reads (0.7×), plus the transposed copy of
each neuron-major W1 that ORT makes when it constant-folds the fallback's dense function body (0.5×) —
while the pipeline still holds each block's float64 folded matrix and packed predictor for the report
(0.4×); Python, ORT and one batch's outputs make the rest. Calibration is bounded by ONNX Runtime's
mapping of the original weights (pass 1 only: later passes replay the recorded block inputs);
statistics, block weights read in place and the new initializers each cost one block at a time (see
``tests/test_memory.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
_ALIGN = 4096  # page-aligned offsets: ONNX Runtime can memory-map such external data


def _external(name: str, shape: list[int], location: str, offset: int, length: int) -> onnx.TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def build(path: Path, layers: int, d: int, D: int, seed: int = 0) -> int:
    """Write the model and ``<path>.data``; return the weight bytes."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, nodes = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as data:
        def put(name: str, array: np.ndarray) -> str:
            nonlocal offset
            pad = (-offset) % _ALIGN
            data.write(b"\0" * pad)
            offset += pad
            raw = np.ascontiguousarray(array, np.float32).tobytes()
            data.write(raw)
            inits.append(_external(name, list(array.shape), data_name, offset, len(raw)))
            offset += len(raw)
            return name

        x = "x"
        for i in range(layers):
            s = f"layer{i}"
            w1 = put(f"{s}.fc1.weight", rng.standard_normal((d, D), np.float32) / np.float32(math.sqrt(d)))
            b1 = put(f"{s}.fc1.bias", rng.normal(0, 0.1, D).astype(np.float32))
            w2 = put(f"{s}.fc2.weight", rng.standard_normal((D, d), np.float32) / np.float32(math.sqrt(D)))
            b2 = put(f"{s}.fc2.bias", rng.normal(0, 0.1, d).astype(np.float32))
            nodes += [helper.make_node("MatMul", [x, w1], [f"{s}/xW1"], name=f"{s}.fc1/MatMul"),
                      helper.make_node("Add", [f"{s}/xW1", b1], [f"{s}/h"], name=f"{s}.fc1/Add"),
                      helper.make_node("Gelu", [f"{s}/h"], [f"{s}/g"], name=f"{s}.act/Gelu"),
                      helper.make_node("MatMul", [f"{s}/g", w2], [f"{s}/gW2"], name=f"{s}.fc2/MatMul"),
                      helper.make_node("Add", [f"{s}/gW2", b2], [f"{s}/f"], name=f"{s}.fc2/Add"),
                      helper.make_node("Add", [x, f"{s}/f"], [f"{s}/y"], name=f"{s}.residual")]
            x = f"{s}/y"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "large_ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.save(model, path)  # tensors are already external: the proto itself is a few kB
    return offset


def calibration(path: Path, d: int, batches: int, rows: int, seed: int = 1) -> Path:
    """A ``load_data()`` script yielding ``batches`` feeds of ``rows`` tokens (no big arrays on disk)."""
    script = path.with_name("calib.py")
    script.write_text(
        "import numpy as np\n\n\ndef load_data():\n"
        f"    rng = np.random.default_rng({seed})\n"
        f"    for _ in range({batches}):\n"
        f"        yield {{'x': rng.standard_normal(({rows}, {d})).astype(np.float32)}}\n")
    return script


def _run_sampled(cmd: list[str]) -> tuple[int, str, dict[str, int]]:
    """Run ``cmd``; sample its RSS every 0.2 s and attribute it to the step its last progress line
    names (``after <step>`` once that step printed ``done``). Returns the exit code, stderr and the
    peak RSS in MB per step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines: list[str] = []
    step = ["start"]

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("[tardis] ") and ": " in line:
                label = line[len("[tardis] "):].rsplit(": ", 1)[0]
                step[0] = f"after {label}" if line.rstrip().endswith("done") else label

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peaks: dict[str, int] = {}
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            rss = next(int(ln.split()[1]) for ln in status.read_text().splitlines() if ln.startswith("VmRSS:"))
            peaks[step[0]] = max(peaks.get(step[0], 0), rss // 1024)
        except (OSError, StopIteration, ValueError):
            pass
        time.sleep(0.2)
    reader.join()
    return proc.returncode, "".join(lines), peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=17)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--D", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--predictor", help="passed to optimize (default: the tool's default)")
    parser.add_argument("--out", default="/tmp/tardis-large")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "large_model.json"))
    args = parser.parse_args(argv)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    src, dst = out / "large.onnx", out / "large.tardis.onnx"
    t0 = time.perf_counter()
    weight_bytes = build(src, args.layers, args.d, args.D)
    build_s = time.perf_counter() - t0
    calib = calibration(src, args.d, args.batches, args.rows)
    cmd = [sys.executable, "-m", "tardis_compile.cli", "optimize", str(src), "-o", str(dst), "--calib", str(calib),
           "--threads", "2"] + (["--predictor", args.predictor] if args.predictor else [])
    t0 = time.perf_counter()
    returncode, stderr, steps = _run_sampled(cmd)
    optimize_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if returncode != 0:
        print(stderr[-3000:], file=sys.stderr)
        return returncode
    out_files = [dst, dst.with_name(dst.name + ".data")]
    report = json.loads(dst.with_name(dst.stem + ".report.json").read_text())
    verification = report.get("verification") or {}
    result = {
        "layers": args.layers, "d": args.d, "D": args.D, "weight_bytes": weight_bytes,
        "calibration_feed_tokens": args.batches * args.rows, "calibration_tokens": report["calibration_tokens"],
        "predictor": report["settings"]["predictor"], "build_seconds": round(build_s, 1),
        "optimize_seconds": round(optimize_s, 1), "peak_rss_bytes": peak,
        "peak_rss_over_weights": round(peak / weight_bytes, 3),
        "peak_rss_by_step_mb": steps,
        "output_bytes": sum(p.stat().st_size for p in out_files if p.exists()),
        "external_data_written": out_files[1].exists(),
        "verified_output_mean_cosine": [o["mean_cosine"] for o in verification.get("outputs", [])],
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
    }
    print(json.dumps(result, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
