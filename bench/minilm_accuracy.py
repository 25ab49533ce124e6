"""Accuracy of the rewrite on the real all-MiniLM-L6-v2: embedding cosine vs fallback target.

For both range strategies (error-aware = ours, coverage = the paper's), with and without the
least-squares refit, at fallback targets 5%, 10%, 20%, with the exact predictor; plus the flag-all
self-test (every neuron takes the exact fallback: max abs error must be ~0). Calibrates on 128 BBC News
articles, evaluates on 256 others. Writes ``bench/results/minilm_accuracy.{json,md}``.

    .venv/bin/python bench/minilm_accuracy.py [--out out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tardis_compile import api
from tardis_compile.demo import prepare

TARGETS = (0.05, 0.10, 0.20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    out, results = Path(args.out), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    model, calib, held, tokenizer = prepare(out)
    data = api.DataOptions(tokenizer=tokenizer, batch_size=16, max_length=128)
    stats = out / "minilm.stats.npz"
    rows = []

    def run(name: str, settings: api.Settings) -> dict:
        t0 = time.time()
        kw = {"stats_in": stats} if stats.exists() else {"stats_out": stats}
        report = api.optimize(model, out / f"bench-{name}.onnx", calib, eval_data=held, settings=settings,
                              data=data, show_progress=False, **kw)
        s = report.summary()
        row = {"run": name, "strategy": settings.fit_strategy, "refit": settings.refit,
               "target_fallback": settings.fallback_target, "flag_all": settings.flag_all,
               "mean_cosine": s["mean_cosine"], "min_cosine": report.verification.outputs[0].min_cosine,
               "max_abs_error": s["max_abs_error"], "fallback_rate": s["fallback_rate"],
               "seconds": time.time() - t0}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    run("flag-all", api.Settings(flag_all=True, refit=False))
    for strategy in ("error", "coverage"):
        for refit in (False, True):
            for target in TARGETS:
                run(f"{strategy}-{'refit' if refit else 'plain'}-{int(target * 100)}",
                    api.Settings(strategy=strategy, refit=refit, target_fallback=target))
    (results / "minilm_accuracy.json").write_text(json.dumps(rows, indent=2))
    lines = ["| strategy | refit | " + " | ".join(f"{int(t * 100)}% target" for t in TARGETS) + " |",
             "|---|---|" + "---|" * len(TARGETS)]
    for strategy in ("error", "coverage"):
        for refit in (False, True):
            cells = []
            for t in TARGETS:
                r = next(r for r in rows if r["strategy"] == strategy and r["refit"] == refit
                         and r["target_fallback"] == t and not r["flag_all"])
                cells.append(f"{r['mean_cosine']:.4f} ({r['fallback_rate']:.1%})")
            lines.append(f"| {strategy} | {'on' if refit else 'off'} | " + " | ".join(cells) + " |")
    flag = rows[0]
    lines.append("")
    lines.append(f"Flag-all self-test: max abs error {flag['max_abs_error']:.2e}, mean cosine {flag['mean_cosine']:.6f}.")
    (results / "minilm_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
