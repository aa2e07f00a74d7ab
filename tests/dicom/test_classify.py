"""Series classification and picking from tags alone (no files): descriptions of several vendors,
sequence parameters when the description says nothing, site overrides, and the one-line error for a
study missing a modality."""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorseg.dicom.config import ClassifyConfig
from tumorseg.dicom.series import DicomInputError, Series, SliceHeader, Study, classify, pick_series

CFG = ClassifyConfig()


def _series(
    description: str,
    *,
    number: int = 1,
    te: float | None = 10.0,
    ti: float | None = None,
    contrast: bool = False,
    slices: int = 40,
    thickness: float = 1.0,
    acquisition: str = "3D",
    image_type: str = "ORIGINAL\\PRIMARY\\M",
    diffusion: bool = False,
) -> Series:
    s = Series(
        study_uid="1.2.3",
        uid=f"1.2.3.{number}",
        number=number,
        description=description,
        protocol="",
        sequence_name="",
        image_type=image_type,
        modality_tag="MR",
        echo_time=te,
        repetition_time=2000.0,
        inversion_time=ti,
        contrast=contrast,
        acquisition_type=acquisition,
        slice_thickness=thickness,
        diffusion=diffusion,
    )
    s.slices = [
        SliceHeader(
            path=Path(f"/x/{number}/{k}.dcm"),
            sop_uid=f"1.2.3.{number}.{k}",
            position=(0.0, 0.0, k * thickness),
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            pixel_spacing=(1.0, 1.0),
            rows=64,
            columns=64,
            frames=1,
            is_image=True,
            sop_class="1.2.840.10008.5.1.4.1.1.4",
            transfer_syntax="1.2.840.10008.1.2.1",
        )
        for k in range(slices)
    ]
    return s


@pytest.mark.parametrize(
    ("description", "kwargs", "expected"),
    [
        ("T1_MPRAGE_SAG_+C", {"contrast": True}, "t1ce"),
        ("AX T1 POST GD", {}, "t1ce"),
        ("sag 3D T1 BRAVO +C", {}, "t1ce"),
        ("T1W_3D_TFE_Gd", {}, "t1ce"),
        ("t1_mprage_sag", {}, "t1"),
        ("AX T1 PRE", {}, "t1"),
        ("T1 pre Gd", {}, "t1"),  # says pre-contrast, no agent tag
        ("t1_mprage_sag", {"contrast": True}, "t1ce"),  # the agent tag wins over a plain description
        ("t2_tse_tra", {"te": 95.0}, "t2"),
        ("AX T2 FSE", {"te": 100.0}, "t2"),
        ("t2_flair_tra", {"te": 90.0, "ti": 2500.0}, "flair"),
        ("T2W_FLAIR", {"te": 120.0, "ti": 2400.0}, "flair"),
        ("3D FLAIR SAG", {"te": 380.0, "ti": 1800.0}, "flair"),
        ("3-plane loc", {"slices": 3}, "other"),
        ("Survey", {}, "other"),
        ("ep2d_diff_trace", {"te": 90.0}, "other"),
        ("DWI b1000", {"te": 90.0}, "other"),
        ("ADC", {"te": 90.0}, "other"),
        ("SE", {"te": 12.0}, "t1"),  # nothing in the description: TE decides
        ("Series 5", {"te": 100.0}, "t2"),
        ("", {"te": 110.0, "ti": 2500.0}, "flair"),
        ("", {"te": 10.0, "contrast": True}, "t1ce"),
        ("mystery", {"te": 45.0}, "other"),
        ("T1 something", {"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"}, "other"),
        ("AX T2", {"diffusion": True}, "other"),
    ],
)
def test_classify(description: str, kwargs: dict, expected: str) -> None:
    modality, reason = classify(_series(description, **kwargs), CFG)
    assert modality == expected, reason
    assert reason


def test_site_overrides_win_by_uid_and_by_description() -> None:
    s = _series("weird vendor name", te=10.0)
    by_uid = ClassifyConfig(overrides={s.uid: "flair"})
    assert classify(s, by_uid)[0] == "flair"
    by_text = ClassifyConfig(overrides={"^weird": "t2"})
    assert classify(s, by_text) == ("t2", "site override ('^weird')")


def test_pick_prefers_3d_then_finer() -> None:
    t1_3d = _series("t1_mprage_sag", number=2, slices=160)
    t1_2d = _series("AX T1 SE", number=3, thickness=5.0, slices=30, acquisition="2D")
    t2_thin = _series("AX T2", number=4, te=100.0, thickness=3.0, acquisition="2D")
    t2_thick = _series("AX T2 thick", number=5, te=100.0, thickness=5.0, acquisition="2D")
    ce = _series("AX T1 POST GD", number=6)
    fl = _series("T2W_FLAIR", number=7, te=120.0, ti=2400.0)
    study = Study("1.2.3", "MR BRAIN", [t1_2d, t1_3d, t2_thick, t2_thin, ce, fl])
    for s in study.series:
        s.modality, s.reason = classify(s, CFG)
    picked = pick_series(study)
    assert picked["t1"] is t1_3d
    assert picked["t2"] is t2_thin
    assert picked["t1ce"] is ce and picked["flair"] is fl


def test_a_study_without_flair_names_what_it_has() -> None:
    series = [
        _series("t1_mprage", number=1),
        _series("AX T1 POST GD", number=2),
        _series("AX T2", number=3, te=90.0),
    ]
    study = Study("1.2.3", "MR BRAIN", series)
    for s in study.series:
        s.modality, s.reason = classify(s, CFG)
    with pytest.raises(DicomInputError) as err:
        pick_series(study)
    message = str(err.value)
    assert "\n" not in message
    assert "no FLAIR series" in message
    assert 'T2: series 3 "AX T2"' in message and "dicom.classify.overrides" in message
