"""``make bench-dicom``: rigid co-registration of T1, T2 and FLAIR to T1ce on the generated
DICOM studies with SimpleITK (what ``import-dicom`` uses) and with ITK-elastix, scored as
``dicom-check`` scores it (target registration error over the true brain against the known
transforms), with the seconds each took on the same machine in the same run.

ITK-elastix runs in its own environment (``.venv-elastix``: itk-elastix and numpy as pinned in
constraints.txt) through benchmarks/elastix_rigid.py, so the project's environment does not carry ITK.
Usage::

    python -m benchmarks.registration --elastix-python .venv-elastix/bin/python \\
        --out benchmarks/registration.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT, cpu_text, write_report

MOVING = ("t1", "t2", "flair")


def _tre(estimated: np.ndarray, true: np.ndarray, points: np.ndarray) -> float:
    from tumorseg.dicom.check import _apply

    return float(np.linalg.norm(_apply(estimated, points) - _apply(true, points), axis=1).mean())


def run(studies: Path, elastix_python: str, threads: int) -> dict[str, Any]:
    import SimpleITK as sitk
    import torch

    from tumorseg.dicom.check import _TRE_POINTS, _lps_points
    from tumorseg.dicom.prepare import register_rigid, rigid_matrix
    from tumorseg.dicom.series import pick_series, read_series, scan
    from tumorseg.params import load_params
    from tumorseg.runtime import cpu_description

    params = load_params(ROOT / "params.yaml")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    torch.set_num_threads(threads)
    truth_root = studies / "truth"
    names = sorted(p.name for p in truth_root.iterdir() if (p / "truth.json").is_file())
    rows = []
    with tempfile.TemporaryDirectory(prefix="tumorseg-bench-registration-") as tmp:
        for n, name in enumerate(names, 1):
            truth = json.loads((truth_root / name / "truth.json").read_text())
            head_to = {
                s["modality"]: np.asarray(s["head_to_scanner"], dtype=float)
                for s in truth["series"]
                if s["modality"] != "other"
            }
            points = _lps_points(sitk.ReadImage(str(truth_root / name / "brain_t1ce.nii.gz")), _TRE_POINTS)
            picked = pick_series(scan(studies / name, params.dicom.classify)[0])
            images = {m: read_series(picked[m])[0] for m in ("t1ce", *MOVING)}
            files = {}
            for m, image in images.items():
                files[m] = Path(tmp) / f"{name}_{m}.mha"
                sitk.WriteImage(image, str(files[m]))
            for m in MOVING:
                true = head_to[m] @ np.linalg.inv(head_to["t1ce"])
                start = time.perf_counter()
                matrix = rigid_matrix(register_rigid(images["t1ce"], images[m], params.dicom.registration))
                sitk_seconds = time.perf_counter() - start
                out = subprocess.run(
                    [elastix_python, str(ROOT / "benchmarks" / "elastix_rigid.py"), str(files["t1ce"]), str(files[m]),
                     str(threads)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                elastix = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({
                    "study": name,
                    "modality": m,
                    "moving": picked[m].label,
                    "simpleitk_tre_mm": round(_tre(matrix, true, points), 3),
                    "simpleitk_seconds": round(sitk_seconds, 2),
                    "elastix_tre_mm": round(_tre(np.asarray(elastix["fixed_to_moving_lps"]), true, points), 3),
                    "elastix_seconds": round(float(elastix["seconds"]), 2),
                })  # fmt: skip
            print(
                f"[{n}/{len(names)}] {name}: TRE SimpleITK "
                + " / ".join(f"{r['simpleitk_tre_mm']:.2f}" for r in rows[-3:])
                + " mm, elastix "
                + " / ".join(f"{r['elastix_tre_mm']:.2f}" for r in rows[-3:])
                + " mm",
                flush=True,
            )

    def mean(key: str) -> float:
        return round(float(np.mean([r[key] for r in rows])), 3)

    summary = {
        "pairs": len(rows),
        "simpleitk_tre_mm_mean": mean("simpleitk_tre_mm"),
        "simpleitk_tre_mm_max": round(max(r["simpleitk_tre_mm"] for r in rows), 3),
        "elastix_tre_mm_mean": mean("elastix_tre_mm"),
        "elastix_tre_mm_max": round(max(r["elastix_tre_mm"] for r in rows), 3),
        "simpleitk_seconds_mean": mean("simpleitk_seconds"),
        "elastix_seconds_mean": mean("elastix_seconds"),
    }
    summary["elastix_time_ratio"] = round(
        summary["elastix_seconds_mean"] / summary["simpleitk_seconds_mean"], 3
    )
    elastix_version = subprocess.run(
        [elastix_python, "-c", "import importlib.metadata as m; print(m.version('itk-elastix'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return {
        "cpu": cpu_description(),
        "threads": threads,
        "studies": str(
            studies.resolve().relative_to(ROOT) if studies.resolve().is_relative_to(ROOT) else studies
        ),
        "simpleitk": sitk.Version_VersionString(),
        "itk_elastix": elastix_version,
        "summary": summary,
        "pairs": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    s, cpu = result["summary"], result["cpu"]
    lines = [
        "# Rigid co-registration to T1ce: SimpleITK against ITK-elastix",
        "",
        f"`make bench-dicom`, {s['pairs']} series of the generated studies in `{result['studies']}`; "
        f"SimpleITK {result['simpleitk']}, itk-elastix {result['itk_elastix']}; {cpu_text(cpu, result['threads'])}",
        "",
        "| | mean TRE (mm) | largest TRE (mm) | seconds per series | time ratio |",
        "|---|---|---|---|---|",
        f"| SimpleITK (import-dicom) | {s['simpleitk_tre_mm_mean']:.3f} | {s['simpleitk_tre_mm_max']:.3f} | "
        f"{s['simpleitk_seconds_mean']:.1f} | 1.00 |",
        f"| ITK-elastix | {s['elastix_tre_mm_mean']:.3f} | {s['elastix_tre_mm_max']:.3f} | "
        f"{s['elastix_seconds_mean']:.1f} | {s['elastix_time_ratio']:.2f} |",
        "",
        "| study | series | TRE SimpleITK | TRE elastix | s SimpleITK | s elastix |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['study']} | {r['modality']} {r['moving']} | {r['simpleitk_tre_mm']:.2f} | {r['elastix_tre_mm']:.2f} | "
        f"{r['simpleitk_seconds']:.1f} | {r['elastix_seconds']:.1f} |"
        for r in result["pairs"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.registration", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--studies", type=Path, default=ROOT / "data" / "dicom_studies")
    parser.add_argument("--elastix-python", default=str(ROOT / ".venv-elastix" / "bin" / "python"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "registration.json")
    args = parser.parse_args(argv)
    if not (args.studies / "truth").is_dir():
        parser.error(f"{args.studies}: no generated studies with truth; run `dvc repro dicom_studies` first")
    if not Path(args.elastix_python).is_file():
        parser.error(f"{args.elastix_python}: no ITK-elastix environment; run `make bench-dicom`")
    result = run(args.studies, args.elastix_python, args.threads)
    write_report(args.out, result, markdown(result), "registration")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
