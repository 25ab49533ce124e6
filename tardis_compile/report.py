"""What happened, per block and overall: parameter accounting (METHOD.md §5), fit, verification.

Written as ``report.json`` (machine-readable) and ``report.md`` (for people); the CLI prints the table.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tardis_compile import fallback_op, modelio
from tardis_compile.passes.ffn_match import FfnBlock, Rejection
from tardis_compile.verify import Verification


@dataclasses.dataclass
class BlockReport:
    """One rewritten block: its shapes, how it was matched, its parameter counts and predictor, and (after
    verification) what was measured on the evaluation data."""

    name: str
    spelling: str
    source_nodes: list[str]
    d: int
    hidden: int
    d_out: int
    variant: str
    calibrated_coverage: float
    params_original: int  # W1 + W2
    params_folded: float  # W_f (dtype-equivalents: an 8-bit fold counts a quarter in float32, plus scales)
    params_predictor: float
    params_fallback: int  # W1ᵀ + W2 rows kept for the fallback
    predictor: dict = dataclasses.field(default_factory=dict)  # kind, margin z, calibrated recall/flagged
    resident_neurons: int = 0  # neurons whose original weights are kept for the fallback
    measured: dict | None = None  # from verification: coverage, fallback_rate, recall, precision, error

    @property
    def reduction(self) -> float:
        """FFN parameter reduction as the paper counts it: 1 − (W_f + predictor) / (W1 + W2)."""
        return 1.0 - (self.params_folded + self.params_predictor) / self.params_original

    def touched_per_token(self, fallback_rate: float) -> float:
        return self.params_folded + self.params_predictor + fallback_rate * self.params_fallback

    @property
    def resident_share(self) -> float:
        """Share of the block's neurons that keep their weights for the fallback."""
        return self.resident_neurons / self.hidden

    def flagged_share(self, resident_rate: float) -> float:
        """Share of *all* the block's token-neuron pairs flagged, from the op's rate over resident neurons."""
        return resident_rate * self.resident_share

    def coverage(self, resident_coverage: float) -> float:
        """Share of *all* the block's token-neuron pairs in range, from the op's share over resident neurons
        (a neuron without resident weights is always linear: always in range)."""
        return 1.0 - (1.0 - resident_coverage) * self.resident_share

    @property
    def calibrated_rate(self) -> float:
        """The calibrated out-of-range share, over the resident neurons (the op's view)."""
        return (1.0 - self.calibrated_coverage) / max(self.resident_share, 1e-12)

    @property
    def resident(self) -> float:
        return self.params_folded + self.params_predictor + self.params_fallback

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        rate = (self.measured or {}).get("fallback_rate", self.calibrated_rate)  # over the resident neurons
        out.update(reduction=self.reduction, params_touched_per_token=self.touched_per_token(rate),
                   params_resident=self.resident)
        return out


def block_report(block: FfnBlock, coverage: float, predictor_params: float, predictor: dict,
                 resident_neurons: int | None = None, folded_params: float | None = None) -> BlockReport:
    """``resident_neurons``: how many neurons keep their weights for the fallback (None: all);
    ``folded_params``: what the folded matrix stores (None: d·d_out in the model dtype)."""
    d, hidden, d_out = block.d, block.hidden, block.d_out
    kept = hidden if resident_neurons is None else resident_neurons
    return BlockReport(
        block.name, block.spelling, [n.name for n in block.nodes], d, hidden, d_out, block.variant, coverage,
        d * hidden + hidden * d_out, d * d_out if folded_params is None else folded_params, predictor_params,
        kept * (d + d_out), predictor, kept)


@dataclasses.dataclass
class Report:
    """What ``optimize`` did: the rewritten blocks, the rejected candidates with their reasons, the settings
    and the verification of the output model (``summary()``, ``table()``, ``markdown()``, ``write()``)."""

    model: str
    output: str | None
    settings: dict
    blocks: list[BlockReport]
    rejected: list[Rejection]
    verification: Verification | None = None
    verified_on: str = ""
    calibration_tokens: int = 0
    plots: list[str] | None = None  # file names next to the report (None: not attempted)

    def to_dict(self) -> dict:
        """Everything, JSON-ready (the ``.report.json`` file), the summary included."""
        return {
            "model": self.model, "output": self.output, "settings": self.settings,
            "calibration_tokens": self.calibration_tokens,
            "blocks": [b.to_dict() for b in self.blocks],
            "rejected": [dataclasses.asdict(r) for r in self.rejected],
            "verification": dataclasses.asdict(self.verification) if self.verification else None,
            "verified_on": self.verified_on, "plots": self.plots,
            "summary": self.summary(),
        }

    def summary(self) -> dict:
        """Headline numbers: blocks rewritten and rejected, FFN parameter reduction and resident share and,
        when verified, fallback rate, share touched per token, max abs error, mean cosine and the worst
        block's own error ({} with no block)."""
        if not self.blocks:
            return {}
        original = sum(b.params_original for b in self.blocks)
        kept = sum(b.params_folded + b.params_predictor for b in self.blocks)
        out = {"blocks_rewritten": len(self.blocks), "candidates_rejected": len(self.rejected),
               "ffn_param_reduction": 1.0 - kept / original}
        if self.verification is not None:
            v = self.verification
            # the op sees the resident neurons only: its flagged share, over all of the block's neurons
            rates = [b.flagged_share(m.fallback_rate) for b, m in zip(self.blocks, v.blocks)]
            out.update(max_abs_error=v.max_abs_error, mean_cosine=v.mean_cosine, passed=v.passed,
                       fallback_rate=sum(rates) / len(rates) if rates else 0.0)
            touched = sum(b.touched_per_token(m.fallback_rate) for b, m in zip(self.blocks, v.blocks))
            out["params_touched_per_token_ratio"] = touched / original
            own = [m.own_error for m in v.blocks if m.own_error == m.own_error]  # nan: original block unknown
            if own:
                out["max_own_error"] = max(own)
        out["params_resident_ratio"] = sum(b.resident for b in self.blocks) / original
        return {k: v.item() if hasattr(v, "item") else v for k, v in out.items()}  # plain floats, not numpy

    def table(self) -> str:
        """The per-block table (Markdown, also readable in a terminal)."""
        rows = ["| block | spelling | d×D | predictor | resident | coverage | flagged | recall | precision | "
                "own error | error in model | reduction | touched/token |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        measured = {fallback_op.block_name(m.name): m for m in (self.verification.blocks if self.verification else [])}
        for b in self.blocks:
            m = measured.get(b.name)
            cov = f"{b.coverage(m.coverage):.1%}" if m else f"{b.calibrated_coverage:.1%} (calib)"
            kept = b.resident_share
            rate = m.fallback_rate if m else b.calibrated_rate
            z = b.predictor.get("margin_z")
            pred = b.predictor.get("kind", "?") + (f" (z={z:.2f})" if z else "")
            if b.resident_neurons == 0:
                pred = "none (always linear)"
            rows.append(
                f"| {b.name} | {b.spelling} | {b.d}×{b.hidden} | {pred} | {kept:.0%} | {cov} | {b.flagged_share(rate):.1%} | "
                f"{(f'{m.recall:.3f}' if m else '-')} | {(f'{m.precision:.3f}' if m else '-')} | "
                f"{(f'{m.own_error:.2e}' if m else '-')} | {(f'{m.relative_error:.2e}' if m else '-')} | "
                f"{b.reduction:.1%} | {b.touched_per_token(rate) / b.params_original:.1%} |")
        return "\n".join(rows)

    def markdown(self) -> str:
        """The ``.report.md`` file: summary, per-block table, plots and rejected candidates."""
        s = self.summary()
        lines = [f"# tardis-compile report: `{Path(self.model).name}`", "",
                 f"- output: `{self.output}`", f"- settings: `{json.dumps(self.settings)}`",
                 f"- calibration tokens: {self.calibration_tokens:,}",
                 f"- blocks rewritten: {len(self.blocks)}, candidates rejected: {len(self.rejected)}",
                 f"- FFN parameter reduction (paper's accounting, incl. predictor): "
                 f"{s.get('ffn_param_reduction', 0):.1%}; stored (resident): {s.get('params_resident_ratio', 1):.1%}"
                 + (f"; touched per token: {s['params_touched_per_token_ratio']:.1%}"
                    if "params_touched_per_token_ratio" in s else "") + " of the original FFN parameters"]
        if self.verification is not None:
            v = self.verification
            lines += [f"- verification ({self.verified_on}, {v.batches} batches): max abs error "
                      f"{v.max_abs_error:.3g}, mean cosine {v.mean_cosine:.5f}, "
                      f"{'passed' if v.passed else 'FAILED: ' + '; '.join(v.failures)}"]
            lines += ["", "| output | max abs error | mean cosine | min cosine | rel. error | share over bound |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {o.name} | {o.max_abs_error:.3g} | {o.mean_cosine:.5f} | {o.min_cosine:.5f} | "
                      f"{o.relative_error:.3g} | {o.share_over_bound:.2%} |" for o in v.outputs]
        budget = next((f"--{k.replace('_', '-')} {self.settings[k]:g}" for k in ("max_error", "target_params")
                       if self.settings.get(k) is not None), None)
        if budget:
            worst = s.get("max_own_error") if self.settings.get("max_error") is not None else None
            lines += [f"- {budget}: solved fallback rate {self.settings.get('solved_fallback_rate', float('nan')):.2%}"
                      + (f", worst block's own error {worst:.4g} on the verification data" if worst else "")]
        lines += ["", "## Blocks", "", self.table()]
        if self.plots:
            lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in self.plots]
        elif self.plots is not None:
            lines += ["", "(plots need matplotlib: `pip install tardis-compile[bench]`)"]
        if self.rejected:
            lines += ["", "## Candidates left alone", "", "| anchor | op | stage | reason |", "|---|---|---|---|"]
            lines += [f"| {r.anchor} | {r.op_type} | {r.stage} | {r.reason} |" for r in self.rejected]
        return "\n".join(lines) + "\n"

    def write(self, json_path: Path, md_path: Path) -> None:
        """Write ``to_dict()`` as JSON and ``markdown()`` to the two paths, each atomically."""
        modelio.write_text(json_path, json.dumps(self.to_dict(), indent=2, default=float))
        modelio.write_text(md_path, self.markdown())
