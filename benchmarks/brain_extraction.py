"""Brain extraction on brains that are not the MNI152 template's: the trained network against
nilearn's MNI152 mask registered to the T1ce (``dicom.brain.model: mni152``).

The generated DICOM studies' brains are warped from MNI152, which flatters the atlas there. Here the
brains are the independent generator's procedural ones (:mod:`tumorseg.data.independent`: no
template), wrapped in the same head layers (:func:`tumorseg.dicom.heads.synth_head`), and both
extractors see the same head at 1 mm. Usage::

    python -m benchmarks.brain_extraction --cases 6 --out benchmarks/brain_extraction.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, cpu_text, write_report

SEED, HEAD_SEED = 2718, 5


def head_around_independent_brain(index: int) -> Any:
    """Case ``index`` of the independent set (seed :data:`SEED`, 1 mm) in RAS order, in a head."""
    from tumorseg.data.independent import independent_case
    from tumorseg.data.synth import SyntheticCase
    from tumorseg.dicom.heads import synth_head

    case = independent_case(index, seed=SEED, spacing_mm=1.0)
    # stored LPS-ordered: flip x and y for RAS order (what the network and the heads expect)
    images = {
        m: np.ascontiguousarray(np.asarray(v, dtype=np.float32)[::-1, ::-1, :])
        for m, v in case.images.items()
    }
    labels = np.ascontiguousarray(case.labels[::-1, ::-1, :])
    brain = (images["t1"] > 0) | (labels > 0)
    healthy = brain & (labels == 0)
    # the heads scale their layers by the brain's white-matter and CSF levels: the brightest healthy
    # T1 voxels and the brightest healthy T2 voxels stand for them (this generator keeps no tissue maps)
    wm = healthy & (images["t1"] >= np.quantile(images["t1"][healthy], 0.85))
    csf = healthy & (images["t2"] >= np.quantile(images["t2"][healthy], 0.97))
    affine = np.eye(4)
    affine[:3, 3] = -0.5 * (np.asarray(labels.shape) - 1)
    wrapped = SyntheticCase(
        index=index, images=images, labels=labels, affine=affine, spacing=(1.0, 1.0, 1.0),
        tumour_free=case.tumour_free, brain_mask=brain,
        tissue={"wm": wm.astype(np.float32), "csf": csf.astype(np.float32)},
    )  # fmt: skip
    return synth_head(wrapped, seed=HEAD_SEED)


def run(cases: int, threads: int) -> dict[str, Any]:
    import torch

    from tumorseg.dicom.atlas import AtlasBrainExtractor
    from tumorseg.dicom.brain import dice, load_brain_extractor
    from tumorseg.params import load_params
    from tumorseg.runtime import cpu_description
    from tumorseg.tracking import params_tracking_uri

    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    network = load_brain_extractor(params.dicom.brain.model, tracking_uri=params_tracking_uri(params))
    atlas = AtlasBrainExtractor()
    rows = []
    for index in range(1, cases + 1):
        head = head_around_independent_brain(index)
        row: dict[str, Any] = {"case": index}
        for name, extractor in (("network", network), ("mni152", atlas)):
            start = time.perf_counter()
            mask = extractor.extract(head.images, head.affine)
            row[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
            row[f"{name}_dice"] = round(dice(mask, head.brain_mask), 4)
        rows.append(row)
        print(
            f"[{index}/{cases}] Dice network {row['network_dice']:.3f}, MNI152 {row['mni152_dice']:.3f}",
            flush=True,
        )
    summary = {
        f"{name}_{stat}": round(float(fn([r[f"{name}_{key}"] for r in rows])), 4)
        for name in ("network", "mni152")
        for stat, fn, key in (("dice_mean", np.mean, "dice"), ("dice_min", np.min, "dice"), ("seconds_mean", np.mean, "seconds"))
    }  # fmt: skip
    return {
        "cpu": cpu_description(),
        "threads": threads,
        "network": params.dicom.brain.model,
        "independent_seed": SEED,
        "head_seed": HEAD_SEED,
        "summary": summary,
        "cases": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    s, cpu = result["summary"], result["cpu"]
    lines = [
        "# Brain extraction on heads around non-template brains",
        "",
        f"`make bench-dicom`: {len(result['cases'])} brains of the independent generator (seed "
        f"{result['independent_seed']}, procedural anatomy) in generated heads (seed {result['head_seed']}), 1 mm; "
        f"{cpu_text(cpu, result['threads'])}",
        "",
        "| extractor | mean Dice | lowest Dice | seconds per head | time ratio |",
        "|---|---|---|---|---|",
        f"| network (`{result['network']}`) | {s['network_dice_mean']:.3f} | {s['network_dice_min']:.3f} | "
        f"{s['network_seconds_mean']:.1f} | 1.00 |",
        f"| MNI152 mask, registered (`mni152`) | {s['mni152_dice_mean']:.3f} | {s['mni152_dice_min']:.3f} | "
        f"{s['mni152_seconds_mean']:.1f} | {s['mni152_seconds_mean'] / s['network_seconds_mean']:.1f} |",
        "",
        "| case | Dice network | Dice MNI152 |",
        "|---|---|---|",
    ]
    lines += [f"| {r['case']} | {r['network_dice']:.3f} | {r['mni152_dice']:.3f} |" for r in result["cases"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.brain_extraction", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "brain_extraction.json")
    args = parser.parse_args(argv)
    result = run(args.cases, args.threads)
    write_report(args.out, result, markdown(result), "brain extraction")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
