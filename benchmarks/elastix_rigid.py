"""Rigid registration with ITK-elastix, run in its own environment (``make bench-dicom``).

``python benchmarks/elastix_rigid.py FIXED MOVING THREADS`` prints one JSON line: the 4x4 LPS matrix
taking a point of FIXED to the same anatomy in MOVING (ITK's convention, as SimpleITK's) and the
seconds elastix took. Only ``itk-elastix`` and numpy are imported: this file runs outside the
project's environment, whose numpy and scipy pins ANTsPy and ITK's own wheels do not share.
"""

from __future__ import annotations

import json
import sys
import time

import itk
import numpy as np


def main(fixed_path: str, moving_path: str, threads: int) -> dict[str, object]:
    fixed = itk.imread(fixed_path, itk.F)
    moving = itk.imread(moving_path, itk.F)
    parameters = itk.ParameterObject.New()
    rigid = parameters.GetDefaultParameterMap("rigid", 3)
    # As the SimpleITK registration it is compared with: Mattes MI, 32 bins, a 3-level pyramid,
    # random samples; the series share a frame of reference, so no centre-of-mass initialisation.
    rigid["Metric"] = ["AdvancedMattesMutualInformation"]
    rigid["NumberOfHistogramBins"] = ["32"]
    rigid["NumberOfResolutions"] = ["3"]
    rigid["MaximumNumberOfIterations"] = ["250"]
    rigid["NumberOfSpatialSamples"] = ["4096"]
    rigid["AutomaticTransformInitialization"] = ["false"]
    rigid["AutomaticScalesEstimation"] = ["true"]
    rigid["RandomSeed"] = ["121212"]
    parameters.AddParameterMap(rigid)
    start = time.perf_counter()
    _, result = itk.elastix_registration_method(
        fixed, moving, parameter_object=parameters, log_to_console=False, number_of_threads=threads
    )
    seconds = time.perf_counter() - start
    values = [float(v) for v in result.GetParameter(0, "TransformParameters")]
    centre = [float(v) for v in result.GetParameter(0, "CenterOfRotationPoint")]
    euler = itk.Euler3DTransform[itk.D].New()
    euler.SetCenter(centre)
    if result.GetParameter(0, "ComputeZYX")[0:1] == ("true",):
        euler.SetComputeZYX(True)
    euler.SetParameters(itk.OptimizerParameters[itk.D](values))
    matrix = np.eye(4)
    matrix[:3, :3] = itk.array_from_matrix(euler.GetMatrix())
    matrix[:3, 3] = [float(v) for v in euler.GetOffset()]
    return {"fixed_to_moving_lps": matrix.tolist(), "seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
