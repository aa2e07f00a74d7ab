"""The MONAI-only baseline of the cold predict benchmark writes a BraTS label map in the source geometry."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_the_monai_pipeline_segments_a_brats_folder_back_into_each_case_geometry(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    from tumorseg.config import SynthConfig
    from tumorseg.data.synth import synthesize_case, write_case

    cfg = SynthConfig(cases=1, spacing_mm=3.0, seed=1, tumour_free_fraction=0.0, reoriented_fraction=0.0)
    write_case(synthesize_case(1, cfg), tmp_path / "cases", "brats2021", orientation="LPS")
    torch.manual_seed(0)
    network = UNet(3, 4, 3, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    with torch.no_grad():  # a tumour everywhere the bias says so: every region, so every label
        network.model[-1].conv.bias.copy_(torch.tensor([4.0, 4.0, 4.0]))
    torch.save(network, tmp_path / "network.pt")
    args = ["--spacing", "4", "4", "4", "--roi", "16", "16", "16", "--sw-batch-size", "2"]
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "monai_pipeline.py"),
        str(tmp_path / "cases"),
        str(tmp_path / "out"),
    ]
    done = subprocess.run(
        [*cmd, str(tmp_path / "network.pt"), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "monai pipeline: 1 cases in" in done.stdout
    case = next(p for p in (tmp_path / "cases").iterdir() if p.is_dir())
    source = nib.load(case / f"{case.name}_t1.nii.gz")
    written = nib.load(next((tmp_path / "out").glob("*.nii.gz")))
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}
