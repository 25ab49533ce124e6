"""Peak memory of calibration (pass 1) on the real all-MiniLM-L6-v2 over ~100k tokens of BBC News.

Statistics are per-neuron histograms with per-bin moments, so memory must not grow with tokens; this
measures peak RSS (``ru_maxrss``) at two token counts in separate processes and writes
``bench/results/calib_memory.json``.

    .venv/bin/python bench/calib_memory.py [--out out] [--tokens 100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def measure(out: Path, tokens: int) -> dict:
    from tardis_compile import api, modelio
    from tardis_compile.calibrate import collect_stats
    from tardis_compile.demo import prepare
    from tardis_compile.models import corpora
    from tardis_compile.passes.ffn_match import find_blocks

    model_path, _, _, tokenizer = prepare(out)
    docs = [t for t, _ in corpora.bbc_news(unique=True)][: tokens // 128 + 1]
    model = modelio.load(model_path)
    blocks, _ = find_blocks(model)
    source = api.feeds.from_text(docs, tokenizer / "tokenizer.json", ["input_ids", "attention_mask"],
                                 batch_size=16, max_length=128)
    t0 = time.time()
    stats = collect_stats(model, blocks, source)
    return {"tokens_requested": tokens, "tokens_seen": min(s.tokens for s in stats.values()),
            "seconds": time.time() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Path(args.out), args.one)))
        return
    rows = []
    for tokens in (args.tokens // 8, args.tokens):
        proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--one", str(tokens)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "calib_memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
