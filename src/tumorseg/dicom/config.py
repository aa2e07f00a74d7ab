"""``dicom:`` section of params.yaml: DICOM studies in (``tumorseg import-dicom``), DICOM-SEG out.

Series classification rules, the registration, bias-correction and brain-extraction settings, the
generated heads and studies (``tumorseg synth --generator dicom``) and the brain-extraction model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tumorseg.config import Section

MODALITIES_4 = ("t1", "t1ce", "t2", "flair")


class ClassifyConfig(Section):
    """How a series becomes T1 / T1ce / T2 / FLAIR / other (:mod:`tumorseg.dicom.series`).

    Attributes:
        patterns: modality -> case-insensitive regular expressions searched in SeriesDescription,
            ProtocolName and SequenceName; the first modality with a match wins, in ``order``.
        order: modalities tried in turn (``other`` first: localisers and diffusion are left out
            before a ``T1`` in "T1 localizer" could claim them).
        contrast_tags: a T1 series with any of these tags present and not empty
            (ContrastBolusAgent, ...) is T1ce.
        flair_min_ti_ms: a series with InversionTime at least this and TE above ``t2_min_te_ms`` is
            FLAIR when its description says nothing.
        t2_min_te_ms: TE above which a series without a matching description is T2-weighted.
        t1_max_te_ms: TE below which a series without a matching description is T1-weighted.
        overrides: per-site rules, applied before everything else: a SeriesInstanceUID or a
            regular expression on SeriesDescription -> modality (t1, t1ce, t2, flair, other).
    """

    patterns: dict[str, list[str]] = {
        "other": [
            r"loc(ali[sz]er)?\b",
            r"scout",
            r"survey",
            r"\bdwi\b|diffusion|\bdti\b|\badc\b|trace",
            r"perf|\bdsc\b|\bdce\b|\basl\b",
            r"\bswi\b|\bsw[a-z]*i\b|\bt2\*|\bgre\b|hemo",
            r"\bmra?\b|angio|\btof\b",
            r"calibration|\bcal\b|asset|sense ref",
        ],
        "flair": [r"flair", r"\bdark[ -]?fluid\b", r"\btirm\b", r"\bir[_ -]?t2\b", r"t2[_ -]?ir\b"],
        "t1ce": [
            r"\+\s*c\b",
            r"\bpost\b|post[_ -]?(contrast|gad|gd)",
            r"\bgd\b|gado|contrast|\bce\b|\bc\+|\bkm\b",
            r"mprage.*(post|gd|ce)|(post|gd|ce).*mprage",
        ],
        "t2": [r"\bt2\b|t2[_ -]?(w|tse|fse|space|blade|propeller)|t2w"],
        "t1": [r"\bt1\b|t1[_ -]?(w|se|tse|fse|mprage|spgr|bravo|flash|vibe)|t1w|mprage|spgr|bravo"],
    }
    order: list[Literal["other", "flair", "t1ce", "t2", "t1"]] = ["other", "flair", "t1ce", "t2", "t1"]
    contrast_tags: list[str] = ["ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume"]
    flair_min_ti_ms: float = Field(1500.0, gt=0)
    t2_min_te_ms: float = Field(60.0, gt=0)
    t1_max_te_ms: float = Field(30.0, gt=0)
    overrides: dict[str, Literal["t1", "t1ce", "t2", "flair", "other"]] = {}


class RegisterConfig(Section):
    """Rigid co-registration of T1, T2 and FLAIR to T1ce (SimpleITK, Mattes mutual information).

    Attributes:
        histogram_bins: Mattes MI histogram bins.
        sampling_fraction: share of the fixed image's voxels sampled per iteration (random, seeded).
        level_spacing_mm, smoothing_sigmas_mm: the multi-resolution pyramid, coarse to fine: each
            level works at about this voxel size (the T1ce series shrunk by ``level / its spacing``,
            at least 1) after Gaussian smoothing of this sigma.
        iterations: most gradient-descent iterations per level.
        learning_rate: regular-step gradient descent's first step (parameter units, scaled by shifts).
        min_step: the optimiser stops below this step.
        seed: the sampler's seed (a run is repeatable).
    """

    histogram_bins: int = Field(32, ge=8)
    sampling_fraction: float = Field(0.05, gt=0.0, le=1.0)
    level_spacing_mm: list[float] = [8.0, 4.0, 2.0]
    smoothing_sigmas_mm: list[float] = [4.0, 2.0, 1.0]
    iterations: int = Field(200, ge=1)
    learning_rate: float = Field(1.0, gt=0)
    min_step: float = Field(1e-3, gt=0)
    seed: int = Field(7, ge=1)  # 0 would seed SimpleITK's sampler from the clock

    @model_validator(mode="after")
    def _levels(self) -> RegisterConfig:
        if len(self.level_spacing_mm) != len(self.smoothing_sigmas_mm) or not self.level_spacing_mm:
            raise ValueError(
                "level_spacing_mm and smoothing_sigmas_mm need one value per level, the same count"
            )
        return self


class BiasConfig(Section):
    """N4 bias-field correction (SimpleITK) on each sequence before brain extraction.

    Attributes:
        enabled: false skips it (the model then sees the scanner's bias field).
        shrink_factor: N4 runs on a copy shrunk by this factor; the field is applied at full size.
        iterations: per fitting level.
        fitting_levels: B-spline refinements.
    """

    enabled: bool = True
    shrink_factor: int = Field(6, ge=1)
    iterations: int = Field(50, ge=1)
    fitting_levels: int = Field(2, ge=1)


class BrainConfig(Section):
    """The brain-extraction network (:mod:`tumorseg.dicom.brain`), trained on generated heads only.

    Attributes:
        model: what ``import-dicom`` loads: an MLflow model URI or a checkpoint path, or ``mni152``
            for nilearn's MNI152 brain mask registered to each study (:mod:`tumorseg.dicom.atlas`).
        model_name: registry name of the trained network (alias ``champion`` after training).
        experiment: MLflow experiment of its training runs.
        out_dir: checkpoint and report folder of the DVC stage.
        train_cases, val_cases: generated heads trained on / checked against (never the studies scored).
        seed: the heads' generator seed (other than ``synth.seed``, ``dicom.studies.seed``).
        spacing_mm: the network's grid; the mask is brought back to 1 mm.
        channels: U-Net widths per level.
        steps, batch_size, lr: the optimisation.
        threshold: probability above which a voxel is brain.
    """

    model: str = "models:/tumorseg-brain@champion"
    model_name: str = Field("tumorseg-brain", min_length=1)
    experiment: str = Field("tumorseg-brain", min_length=1)
    out_dir: str = "models/brain"
    train_cases: int = Field(24, ge=2)
    val_cases: int = Field(4, ge=1)
    seed: int = 31
    spacing_mm: float = Field(2.0, ge=1.0, le=4.0)
    channels: list[int] = [8, 16, 32, 64]
    steps: int = Field(600, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(2e-3, gt=0)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)


class StudiesConfig(Section):
    """Generated DICOM studies (``tumorseg synth --generator dicom``): heads with skull, scalp and
    background, several series each, for tests, the demo and ``tumorseg dicom-check``.

    Attributes:
        out: where they are written (one folder per study, plus ``truth/``).
        studies: how many.
        seed: their own seed (no case shared with training data or the brain model's heads).
        max_rotation_deg, max_shift_mm: each series' random rigid misalignment (the patient moved).
        distractors: add localiser, diffusion and a 2-D duplicate T1 series to each study.
    """

    out: str = "data/dicom_studies"
    studies: int = Field(3, ge=1)
    seed: int = 4242
    max_rotation_deg: float = Field(8.0, ge=0.0, le=45.0)
    max_shift_mm: float = Field(10.0, ge=0.0)
    distractors: bool = True


class DicomConfig(Section):
    """``dicom:``: DICOM studies in and DICOM-SEG out.

    Attributes:
        classify, registration, bias, brain, studies: see each model.
        spacing_mm: the case written by ``import-dicom`` (BraTS: 1 mm).
        report: where ``tumorseg dicom-check`` writes its figures.
        compare_brain: ``dicom-check`` also scores the brain extractor the import does not use (the
            MNI152 mask when ``brain.model`` is the network, and the reverse) on every study, from the
            same registered, N4-corrected series: about 16 s more per study on 2 cores.
    """

    classify: ClassifyConfig = ClassifyConfig()
    registration: RegisterConfig = RegisterConfig()
    bias: BiasConfig = BiasConfig()
    brain: BrainConfig = BrainConfig()
    studies: StudiesConfig = StudiesConfig()
    spacing_mm: float = Field(1.0, ge=0.5, le=3.0)
    report: str = "reports/dicom"
    compare_brain: bool = False
