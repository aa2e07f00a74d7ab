"""The compression report: one row per variant, the accuracy gate, and the choice of the edge model.

Gate: a variant passes if its mean Dice (over test cases of each case's mean over regions, the
promotion gate's statistic) is at most ``compress.dice_tolerance`` below fp32's on the same cases.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.data.manifest import atomic_output, atomic_write_text
from tumorseg.evaluation.summary import clean_json

BASELINE = "fp32"
EDGE_RUNTIMES = ("onnxruntime", "torch.export")
"""Runtimes of deployable variant files: ONNX models and torch.export programs (bfloat16)."""
REPORT_JSON = "compression.json"
REPORT_MD = "compression.md"
VARIANT_SUFFIXES = (".onnx", ".pt2")
"""Files ``tumorseg compress`` keeps in ``compress.out_dir``."""


@dataclass
class VariantResult:
    """One deployment variant, measured.

    Attributes:
        runtime: ``pytorch`` (fp32: ``weights.pt``), ``onnxruntime`` (``.onnx``) or ``torch.export`` (``.pt2``).
        onnx_max_abs_diff: max |logit difference| from the network or graph it was made from.
        latency_s: median wall time of a latency case's whole ``predict``, averaged over cases; the
            speed-up is ``baseline_latency_s`` (fp32's, alternating with it) over it.
        case_dice_mean: each test case's mean Dice over regions; ``dice_drop``: fp32's mean minus this.
        detection_accuracy: share of the test images whose tumour / no-tumour call is right (2-D
            models, with the detector chosen on validation); None for 3-D.
        accepted: passed the gate (None until gated, and for fp32, the reference); ``rejected_for``:
            the gate's checks a measured variant failed (``dice``, ``detection``).
    """

    name: str
    runtime: str
    file: str | None = None
    file_mb: float | None = None
    parameters: int | None = None
    nonzero_parameters: int | None = None
    sparsity: float | None = None
    gmacs_per_window: float | None = None
    onnx_max_abs_diff: float | None = None
    latency_s: float | None = None
    baseline_latency_s: float | None = None
    latency_runs_s: list[float] = field(default_factory=list)
    inference_s: float | None = None
    dice: dict[str, float] = field(default_factory=dict)
    case_dice_mean: dict[str, float] = field(default_factory=dict)
    dice_drop: float | None = None
    detection_accuracy: float | None = None
    accepted: bool | None = None
    rejected_for: list[str] = field(default_factory=list)
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.latency_s is not None and "mean" in self.dice


def _baseline(results: list[VariantResult]) -> VariantResult | None:
    return next((r for r in results if r.name == BASELINE), None)


def apply_gate(
    results: list[VariantResult], tolerance: float, detection_tolerance: float | None = None
) -> None:
    """Set ``dice_drop`` (on the cases both were scored on), ``accepted`` and ``reason`` of every variant.
    Where fp32 and a variant both have a detection accuracy (2-D), the variant must also call tumour /
    no tumour on as many test images, less ``detection_tolerance`` (None: not gated)."""
    baseline = _baseline(results)
    if baseline is None or "mean" not in baseline.dice:
        raise ValueError("the gate needs the measured fp32 baseline")
    for result in results:
        if result.name == BASELINE:
            result.dice_drop = 0.0
            result.accepted = None
            result.reason = "baseline"
            continue
        if not result.measured:
            result.accepted = False
            result.reason = result.reason or "not measured"
            continue
        common = sorted(set(result.case_dice_mean) & set(baseline.case_dice_mean))
        if common:
            ours = sum(result.case_dice_mean[c] for c in common) / len(common)
            theirs = sum(baseline.case_dice_mean[c] for c in common) / len(common)
        else:
            ours, theirs = result.dice["mean"], baseline.dice["mean"]
        result.dice_drop = theirs - ours
        # A hair of slack for float noise: a drop of exactly the tolerance passes.
        dice_ok = result.dice_drop <= tolerance + 1e-9
        result.rejected_for = [] if dice_ok else ["dice"]
        result.reason = (
            f"Dice drop {result.dice_drop:+.4f} {'<=' if dice_ok else '>'} tolerance {tolerance:g}"
        )
        if (
            detection_tolerance is not None
            and result.detection_accuracy is not None
            and baseline.detection_accuracy is not None
        ):
            drop = baseline.detection_accuracy - result.detection_accuracy
            passed = drop <= detection_tolerance + 1e-9
            if not passed:
                result.rejected_for.append("detection")
            result.reason += f"; detection accuracy drop {drop:+.4f} {'<=' if passed else '>'} tolerance {detection_tolerance:g}"
        result.accepted = not result.rejected_for


def speedup_over(result: VariantResult, baseline: VariantResult | None) -> float | None:
    """fp32 latency / ``result``'s: against fp32 timed alternately with it, else fp32's own median."""
    if baseline is None or not result.latency_s:
        return None
    reference = result.baseline_latency_s or baseline.latency_s
    return reference / result.latency_s if reference else None


def meets_targets(
    result: VariantResult, baseline: VariantResult | None, speedup: float, size_ratio: float
) -> bool:
    """Whether ``result`` is at least ``speedup`` x faster and ``size_ratio`` x smaller than ``baseline``."""
    faster = speedup_over(result, baseline)
    if faster is None or baseline is None or not (result.file_mb and baseline.file_mb):
        return False
    return faster >= speedup and baseline.file_mb / result.file_mb >= size_ratio


def choose_edge(
    results: list[VariantResult],
    *,
    speedup: float = 0.0,
    size_ratio: float = 0.0,
    speed_tie: float = 0.0,
) -> VariantResult | None:
    """The edge model: the best accepted variant with a deployable file (None if none was accepted).

    Variants meeting both targets (:func:`meets_targets`) first; among them, the fastest, where every
    variant within ``speed_tie`` (a share) of the largest speed-up counts as fastest and the smallest
    file wins among those (then the faster, then the lower latency). Accuracy is already settled by
    the gate. "Speed-up" is over fp32 timed alongside (:func:`speedup_over`): each variant's latencies
    are taken in their own block, and a machine that slows down or speeds up between blocks moves
    latencies, not the ratios; ``speed_tie`` keeps what is left of timing noise from trading a much
    smaller file for a speed-up no rerun would reproduce.
    """
    baseline = _baseline(results)
    candidates = [r for r in results if r.accepted and r.runtime in EDGE_RUNTIMES and r.measured]
    if not candidates:
        return None
    pool = [r for r in candidates if meets_targets(r, baseline, speedup, size_ratio)] or candidates
    speed = {r.name: speedup_over(r, baseline) or 0.0 for r in pool}
    fastest = max(speed.values())
    tied = [r for r in pool if speed[r.name] >= fastest * (1.0 - speed_tie) - 1e-12]
    return min(
        tied,
        key=lambda r: (r.file_mb if r.file_mb is not None else math.inf, -speed[r.name], r.latency_s),
    )


def ratios(edge: VariantResult | None, results: list[VariantResult]) -> dict[str, float | None]:
    """Speed-up (:func:`speedup_over`) and size ratio (fp32 file / edge file) of the edge model."""
    baseline = _baseline(results)
    if edge is None or baseline is None or not edge.latency_s or not edge.file_mb:
        return {"speedup": None, "size_ratio": None, "dice_drop": None}
    return {
        "speedup": speedup_over(edge, baseline),
        "size_ratio": baseline.file_mb / edge.file_mb if baseline.file_mb else None,
        "dice_drop": edge.dice_drop,
    }


def report_dict(
    results: list[VariantResult],
    edge: VariantResult | None,
    *,
    tolerance: float,
    context: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report: context (source model, cases, machine), variants, edge and its ratios."""
    return clean_json(
        {
            **context,
            "dice_tolerance": tolerance,
            "edge": edge.name if edge is not None else None,
            "edge_vs_fp32": ratios(edge, results),
            "variants": [asdict(r) for r in results],
        }
    )


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def _worst_case_lines(results: list[VariantResult]) -> list[str]:
    """Per variant the gate rejected, what failed: the test case whose mean Dice fell most against fp32
    (Dice), the share of test images called right (detection)."""
    baseline = _baseline(results)
    if baseline is None:
        return []
    lines = []
    for r in results:
        failed = []
        common = set(r.case_dice_mean) & set(baseline.case_dice_mean)
        if "dice" in r.rejected_for and common:
            case = max(sorted(common), key=lambda c: baseline.case_dice_mean[c] - r.case_dice_mean[c])
            failed.append(
                f"largest per-case drop on {case} "
                f"(mean Dice {baseline.case_dice_mean[case]:.4f} fp32 -> {r.case_dice_mean[case]:.4f})"
            )
        elif "dice" in r.rejected_for:  # no case scored by both: the gate compared the means
            failed.append(f"mean Dice {baseline.dice['mean']:.4f} fp32 -> {r.dice['mean']:.4f}")
        if "detection" in r.rejected_for:
            failed.append(
                f"detection accuracy {baseline.detection_accuracy:.4f} fp32 -> {r.detection_accuracy:.4f}"
            )
        if failed:
            lines.append(f"- {r.name} rejected: {'; '.join(failed)}.")
    return _paragraph(lines)


def _paragraph(lines: list[str]) -> list[str]:
    """``lines`` and a blank line, or nothing."""
    return [*lines, ""] if lines else []


def _precision_lines(results: list[VariantResult]) -> list[str]:
    """A warning per bfloat16 variant timed on a CPU that emulates bfloat16."""
    return _paragraph(
        [
            f"- {r.name}: this CPU has no native bfloat16 (AVX512-BF16, AMX or Arm BF16); PyTorch emulated "
            "it, so its latency here says nothing about a CPU that has it."
            for r in results
            if r.details.get("native_bfloat16") is False and r.latency_s is not None
        ]
    )


def _fine_tune_lines(results: list[VariantResult]) -> list[str]:
    """One line per pruned variant: validation Dice by fine-tune step, and the step kept."""
    lines = []
    for r in results:
        pruning = r.details.get("pruning")
        if not pruning or r.details.get("quantized_from") or r.details.get("converted_from"):
            continue  # the INT8 and bfloat16 variants reuse their float source's fine-tune
        for number, tune in enumerate(pruning.get("fine_tune", []), start=1):
            if not tune.get("curve"):
                continue
            curve = ", ".join(f"{int(step)}: {dice:.4f}" for step, dice in tune["curve"])
            rounds = f" round {number}" if pruning.get("rounds", 1) > 1 else ""
            lines.append(
                f"- {r.name}{rounds} fine-tune, validation Dice mean by step: {curve}; "
                f"kept step {tune['best_step']} ({tune['seconds']:.0f} s)."
            )
    return _paragraph(lines)


def report_markdown(
    results: list[VariantResult], edge: VariantResult | None, *, context: dict[str, Any]
) -> str:
    """A markdown table of every variant, with the edge choice and its ratios underneath."""
    found = dict.fromkeys(k for r in results for k in (r.dice or {}) if k != "mean")
    regions = list(found) or ["WT", "TC", "ET"]
    lines = _table_head(regions, context)
    baseline = _baseline(results)
    lines += [_table_row(r, edge, baseline, regions) for r in results]
    lines.append("")
    lines += _worst_case_lines(results)
    lines += _precision_lines(results)
    lines += _fine_tune_lines(results)
    lines += _edge_lines(results, edge, context.get("targets"))
    if context.get("build_and_measure_s") is not None:
        lines.append(f"Build and measure time: {context['build_and_measure_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _table_head(regions: list[str], context: dict[str, Any]) -> list[str]:
    """Title, measurement conditions and the table header (a Dice column per region)."""
    return [
        "# Model compression",
        "",
        f"Source model: {context.get('source_model', '?')}. Latency: whole `predict` of "
        f"{context.get('latency_case_shape', '?')} case(s) on CPU ({context.get('threads', '?')} threads), "
        f"median of {context.get('repeats', '?')} runs. Dice: {context.get('test_cases', '?')} test cases "
        f"in the source geometry. Gate: mean Dice drop <= {context.get('dice_tolerance', '?')}"
        + (
            f"; detection accuracy on {context['detection_cases']} test images drop <= "
            f"{context.get('detection_tolerance', '?')}."
            if context.get("detection_cases")
            else "."
        ),
        "",
        "| variant | runtime | file MiB | parameters | sparsity | GMAC/window | latency s | inference s "
        "| fp32 alongside s | x fp32 speed | "
        + "".join(f"Dice {region} | " for region in regions)
        + "Dice mean | drop | max abs logit diff | gate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(regions) + "---:|---:|---:|---|",
    ]


def _table_row(
    r: VariantResult, edge: VariantResult | None, baseline: VariantResult | None, regions: list[str]
) -> str:
    gate = "baseline" if r.accepted is None else ("accepted" if r.accepted else "rejected")
    if not r.measured and r.name != BASELINE:
        gate = f"not measured: {r.reason}"
    dice = [_fmt(r.dice.get(region), ".4f") for region in (*regions, "mean")]
    return (
        f"| {r.name}{' **(edge)**' if edge is not None and r.name == edge.name else ''} | {r.runtime} "
        f"| {_fmt(r.file_mb, '.2f')} | {_fmt(r.parameters, ',d')} | {_fmt(r.sparsity, '.2f')} "
        f"| {_fmt(r.gmacs_per_window, '.2f')} | {_fmt(r.latency_s, '.2f')} | {_fmt(r.inference_s, '.2f')} "
        f"| {_fmt(r.baseline_latency_s, '.2f')} | {_fmt(speedup_over(r, baseline), '.2f')} "
        f"| {' | '.join(dice)} | {_fmt(r.dice_drop, '+.4f')} | {_fmt(r.onnx_max_abs_diff, '.2e')} | {gate} |"
    )


def _edge_lines(
    results: list[VariantResult], edge: VariantResult | None, targets: dict[str, float] | None
) -> list[str]:
    """The deployment targets, and which variant was chosen as edge with its ratios to fp32."""
    lines: list[str] = []
    if targets:
        lines += [
            f"Targets: at least {targets['speedup']:g}x faster and {targets['size_ratio']:g}x smaller than fp32 "
            "within the Dice tolerance; the edge model is the accepted variant meeting both, fastest then "
            "smallest (if none meets them: among all accepted variants); fastest = the largest speed-up "
            "over fp32 timed alongside (x fp32 speed)"
            + (
                f", every speed-up within {100 * targets['speed_tie']:g}% of it counting as fastest (the smallest "
                "file among them wins)."
                if targets.get("speed_tie")
                else "."
            ),
            "",
        ]
    if edge is None:
        lines.append("No variant passed the gate: nothing registered as edge; the fp32 model is unchanged.")
        return lines
    ratio = ratios(edge, results)
    lines.append(
        f"Edge: **{edge.name}**: {_fmt(ratio['speedup'], '.2f')}x the fp32 speed, "
        f"{_fmt(ratio['size_ratio'], '.2f')}x smaller file, mean Dice drop {_fmt(ratio['dice_drop'], '+.4f')}."
    )
    if targets:
        met = meets_targets(edge, _baseline(results), targets["speedup"], targets["size_ratio"])
        lines.append(f"Targets met: {'yes' if met else 'no'}.")
    return lines


@dataclass
class CompressionResult:
    """What ``tumorseg compress`` did: every variant (fp32 first), the edge (None: none passed), files,
    and ``registered``: ``{"name", "version", "alias", "uri"}`` of the edge version, or None."""

    variants: list[VariantResult]
    edge: VariantResult | None
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    registered: dict[str, str] | None = None
    run_id: str | None = None

    def one_line(self) -> str:
        if self.edge is None:
            return "compress: no variant passed the Dice gate; nothing registered (fp32 unchanged)"
        r = self.report["edge_vs_fp32"]
        text = (
            f"compress: edge = {self.edge.name}: {r['speedup']:.2f}x the fp32 speed, {r['size_ratio']:.2f}x smaller, "
            f"mean Dice drop {r['dice_drop']:+.4f} (report {self.files.get('report_md')})"
        )
        if self.registered:
            text += f"; registered {self.registered['uri']} as @{self.registered['alias']}"
        return text


def publish(
    results: list[VariantResult],
    report: dict[str, Any],
    out_dir: Path,
    reports: Path,
    context: dict[str, Any],
    edge: VariantResult | None,
) -> dict[str, Path]:
    """Copy the variants' files into ``out_dir`` (replacing the previous run's); write both reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in VARIANT_SUFFIXES:
        for stale in out_dir.glob(f"*{suffix}"):
            stale.unlink()
    files: dict[str, Path] = {}
    for result in results:
        if result.runtime not in EDGE_RUNTIMES or result.file is None:
            continue
        target = out_dir / f"{result.name}{Path(result.file).suffix}"
        with atomic_output(target) as tmp:
            shutil.copyfile(result.file, tmp)
        files[result.name] = target
    reports.mkdir(parents=True, exist_ok=True)
    for variant in report["variants"]:  # the report names the kept files, not the temporary ones
        if variant["name"] in files:
            variant["file"] = str(files[variant["name"]])
    files["report_json"] = reports / REPORT_JSON
    files["report_md"] = reports / REPORT_MD
    atomic_write_text(files["report_json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(files["report_md"], report_markdown(results, edge, context=context))
    return files
