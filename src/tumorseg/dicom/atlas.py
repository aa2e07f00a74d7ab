"""Brain extraction by atlas: nilearn's MNI152 brain mask brought onto the study by an affine
registration of the MNI152 T1 template to the study's T1ce (``dicom.brain.model: mni152``).

T1ce, not T1: it is the series everything is registered to and the one sites acquire in 3-D at about
1 mm; a 2-D T1 with 5 mm slices gave the registration too little to hold on to (decision 0022).

nilearn ships the ICBM 2009a template and its brain mask inside the package, so nothing is
downloaded. The template is skull-stripped, so the study's T1ce is first cut down to a rough brain
(the head above Otsu's threshold, opened by ``_ROUGH_MM``: the opening breaks the thin bridges
between brain and scalp, the largest piece is kept) and the registration (Mattes mutual
information, 12 parameters, multi-resolution, started from the centres of mass) matches brain to
brain. The mask follows the template, is thresholded at half after linear interpolation, reduced to
its largest component and its holes filled. An affine cannot follow a brain's own shape; the
generated heads ``dicom-check`` scores are warped from this same template, which flatters it there
(docs/dicom.md, decision 0022).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ATLAS_URI = "mni152"
_TEMPLATE_RESOLUTION_MM = 2  # the moving image: 2 mm is enough for 12 parameters and 8x cheaper
_LEVEL_SPACING_MM = (8.0, 4.0, 2.0)
_SMOOTHING_MM = (4.0, 2.0, 1.0)
_ROUGH_MM = 6.0  # the opening's radius that separates brain from scalp on the rough brain


def _ras_image(array: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK float32 image of an ``(X, Y, Z)`` array on a RAS-aligned grid with NIfTI ``affine``."""
    from tumorseg.dicom.prepare import Geometry

    array = np.asarray(array, dtype=np.float32)
    return Geometry.from_ras_affine(affine, array.shape).image_of(array)


def _nifti_image(img: Any) -> Any:
    """A nibabel image as SimpleITK (its array, affine and mm)."""
    return _ras_image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def rough_brain(t1: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The voxels above Otsu's threshold, eroded by ``_ROUGH_MM``, largest piece, dilated back inside
    the threshold, holes filled: what the template is registered to."""
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from tumorseg.dicom.brain import largest_component

    spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    radius = tuple(max(1, int(round(_ROUGH_MM / s))) for s in spacing)
    ball = np.ones([2 * r + 1 for r in radius], dtype=bool)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball &= sum((g / r) ** 2 for g, r in zip(grid, radius, strict=True)) <= 1.0
    above = (
        sitk.GetArrayFromImage(sitk.OtsuThreshold(_ras_image(t1, affine), 0, 1, 128)).transpose(2, 1, 0) > 0
    )
    core = largest_component(ndi.binary_erosion(above, ball))
    return ndi.binary_fill_holes(ndi.binary_dilation(core, ball) & above)


class AtlasBrainExtractor:
    """The MNI152 brain mask registered to each study (the interface of
    :class:`~tumorseg.dicom.brain.BrainExtractor`: ``extract(images, affine)``)."""

    description = "nilearn MNI152 (ICBM 2009a) brain mask, affine Mattes-MI registration to T1ce"
    modalities: tuple[str, ...] = ("t1ce",)  # what extract() reads
    version = None
    run_id = None

    def __init__(self, *, seed: int = 7, iterations: int = 200) -> None:
        if int(seed) < 1:  # SimpleITK seeds its sampler from the clock when given 0
            raise ValueError(f"seed must be at least 1 (0 seeds from the clock), got {seed}")
        self.seed = int(seed)
        self.iterations = int(iterations)
        self._template: tuple[Any, Any] | None = None

    def template(self) -> tuple[Any, Any]:
        """``(T1 template, brain mask)`` as SimpleITK images, read once (nilearn's package data)."""
        if self._template is None:
            from nilearn import datasets

            t1 = _nifti_image(datasets.load_mni152_template(resolution=_TEMPLATE_RESOLUTION_MM))
            mask = _nifti_image(datasets.load_mni152_brain_mask(resolution=1))
            self._template = (t1, mask)
        return self._template

    def register(self, fixed: Any) -> Any:
        """Affine transform: a point of ``fixed`` (the study's rough brain) -> the template's point."""
        import SimpleITK as sitk

        from tumorseg.dicom.prepare import set_pyramid

        moving, _ = self.template()
        fixed = sitk.Cast(fixed, sitk.sitkFloat32)
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2, self.seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=self.iterations, relaxationFactor=0.5
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        set_pyramid(reg, fixed, _LEVEL_SPACING_MM, _SMOOTHING_MM)
        reg.SetInitialTransform(initial, inPlace=False)
        return reg.Execute(fixed, moving)

    def extract(self, images: Mapping[str, np.ndarray], affine: np.ndarray) -> np.ndarray:
        """The brain mask (bool, the images' shape) of a study's ``images`` (``t1ce`` is used)."""
        import SimpleITK as sitk

        from tumorseg.dicom.brain import clean_mask
        from tumorseg.errors import DataError

        if "t1ce" not in images:
            raise DataError(
                f"the MNI152 brain mask is registered to the T1ce; the images given are {sorted(images)}"
            )
        t1 = np.asarray(images["t1ce"], dtype=np.float32)
        fixed = _ras_image(np.where(rough_brain(t1, affine), t1, 0.0), affine)
        try:
            transform = self.register(fixed)
        except RuntimeError as exc:  # an empty rough brain, or samples mapped outside the template
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"the MNI152 template could not be registered to the T1ce ({reason[:200]}); "
                "use the trained network (dicom.brain.model: models:/tumorseg-brain@champion)"
            ) from None
        _, mask = self.template()
        warped = sitk.Resample(mask, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return clean_mask(sitk.GetArrayFromImage(warped).transpose(2, 1, 0) > 0.5)

    def __repr__(self) -> str:
        return f"AtlasBrainExtractor({self.description})"
