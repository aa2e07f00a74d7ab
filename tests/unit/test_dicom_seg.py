"""DICOM-SEG out and back in (tumorseg.dicom.seg) on a small generated MR series."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tumorseg.data.conventions import GLIOMA, get_label_set
from tumorseg.dicom import seg as dicom_seg
from tumorseg.dicom.seg import REGION_CODES, SEGMENTATION_STORAGE, read_dicom_seg, write_dicom_seg

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SLICES, ROWS, COLS = 10, 20, 24  # rows != cols: a transposed mask cannot pass


def mr_series(folder: Path, *, slices: int = SLICES, rows: int = ROWS, cols: int = COLS) -> list[Path]:
    """An axial MR series written slice by slice (1 x 1.2 mm pixels, 2 mm slices), with a few
    attributes a SEG must not copy (InstitutionName, ProtocolName, BodyPartExamined)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(5)
    paths = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = "Test^Glioma", "TS-0001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", "ACC1"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240102", "101500", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 3, "MR"
        ds.SeriesDescription, ds.ProtocolName = "AX T1 POST GD", "t1_mprage_post"
        ds.InstitutionName, ds.BodyPartExamined = "Test Hospital", "BRAIN"
        ds.Manufacturer = "ScannerCo"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", "SP", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "3D", 2.5, 2000.0
        ds.ImagePositionPatient = [-12.0, -10.0, -9.0 + 2.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.2]
        ds.SliceThickness, ds.SpacingBetweenSlices = 2.0, 2.0
        ds.SliceLocation = -9.0 + 2.0 * k
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4000, (rows, cols), dtype=np.uint16).tobytes()
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    """The series in descending slice position: the SEG must follow the order given, not the geometry."""
    paths = mr_series(tmp_path_factory.mktemp("mr"))
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in reversed(paths)]


def glioma_case() -> np.ndarray:
    """NCR inside ET inside ED blobs, off-centre (rows and columns differ), on slices 3..7 only."""
    ncr, ed, et = GLIOMA.code("NCR"), GLIOMA.code("ED"), GLIOMA.code("ET")
    labels = np.zeros((SLICES, ROWS, COLS), dtype=np.uint8)
    z, y, x = np.ogrid[:SLICES, :ROWS, :COLS]
    r2 = (z - 5) ** 2 + ((y - 8) / 1.5) ** 2 + ((x - 14) / 1.5) ** 2
    labels[(r2 <= 16) & (z >= 3) & (z <= 7)] = ed
    labels[r2 <= 6] = et
    labels[r2 <= 2] = ncr
    labels[2, 1, 1] = ed  # a lone oedema voxel in a corner slice
    return labels


def test_glioma_codes_are_what_the_case_uses() -> None:
    assert get_label_set("glioma") == GLIOMA
    assert GLIOMA.region_names == ("WT", "TC", "ET")
    assert (GLIOMA.code("NCR"), GLIOMA.code("ED"), GLIOMA.code("ET")) == (1, 2, 3)


def test_round_trip_equals_the_label_set_regions(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = glioma_case()
    out = write_dicom_seg(
        labels, series, tmp_path / "seg.dcm", label_set=GLIOMA, model_name="unet3d", model_version="7"
    )
    assert out == tmp_path / "seg.dcm" and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]
    masks = read_dicom_seg(out, series)
    assert list(masks) == list(GLIOMA.region_names)
    expected = GLIOMA.regions(labels)
    for index, name in enumerate(GLIOMA.region_names):
        assert masks[name].dtype == bool and masks[name].shape == (SLICES, ROWS, COLS)
        np.testing.assert_array_equal(masks[name], expected[index], err_msg=name)
    assert masks["WT"][2, 1, 1] and not masks["TC"][2, 1, 1]


def test_written_object_read_with_plain_pydicom(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    out = write_dicom_seg(
        glioma_case(),
        series,
        tmp_path / "seg.dcm",
        label_set=GLIOMA,
        model_name="unet3d",
        model_version="7",
        series_number=901,
    )
    ds = pydicom.dcmread(out)
    source = series[0]
    assert ds.SOPClassUID == SEGMENTATION_STORAGE == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.BitsAllocated == 1
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.SeriesNumber, ds.SeriesDescription) == (901, "tumorseg tumour regions")
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (ds.PatientID, str(ds.PatientName)) == ("TS-0001", "Test^Glioma")
    (referenced,) = ds.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in series
    }
    assert ds.Manufacturer == "tumorseg" and ds.ManufacturerModelName == "tumorseg"
    assert ds.SoftwareVersions == dicom_seg.software_version() != "unknown"
    # source-only attributes stay behind
    for keyword in ("InstitutionName", "ProtocolName", "BodyPartExamined", "SliceLocation"):
        assert keyword not in ds, keyword
    # one frame per slice and segment: empty slices and regions are encoded, not left out
    assert int(ds.NumberOfFrames) == SLICES * 3
    segments = {item.SegmentNumber: item for item in ds.SegmentSequence}
    assert list(segments) == [1, 2, 3]
    expected = {
        1: ("WT whole tumour", "108369006", "SCT"),
        2: ("TC tumour core", "4147007", "SCT"),
        3: ("ET enhancing tumour", "C113842", "NCIt"),
    }
    for number, (label, value, scheme) in expected.items():
        item = segments[number]
        assert item.SegmentLabel == label
        (category,) = item.SegmentedPropertyCategoryCodeSequence
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        assert category.CodeMeaning == "Morphologically Abnormal Structure"
        (prop,) = item.SegmentedPropertyTypeCodeSequence
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (value, scheme)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("unet3d", "7")
        (family,) = algorithm.AlgorithmFamilyCodeSequence
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")


def test_an_empty_region_is_an_empty_segment(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = glioma_case()
    labels[labels == GLIOMA.code("ET")] = GLIOMA.code("NCR")  # no enhancing tumour anywhere
    out = write_dicom_seg(
        labels, series, tmp_path / "seg.dcm", label_set=GLIOMA, model_name="m", model_version="1"
    )
    masks = read_dicom_seg(out, series)
    assert list(masks) == ["WT", "TC", "ET"]
    assert not masks["ET"].any() and masks["TC"].any()
    assert [i.SegmentLabel for i in pydicom.dcmread(out).SegmentSequence][2] == "ET enhancing tumour"


@pytest.mark.parametrize("omit_empty_frames", [False, True])
def test_a_tumour_free_case_is_a_valid_seg(
    series: list[pydicom.Dataset], tmp_path: Path, omit_empty_frames: bool
) -> None:
    labels = np.zeros((SLICES, ROWS, COLS), dtype=np.uint8)
    out = write_dicom_seg(
        labels,
        series,
        tmp_path / "seg.dcm",
        label_set=GLIOMA,
        model_name="m",
        model_version="1",
        omit_empty_frames=omit_empty_frames,
    )
    ds = pydicom.dcmread(out)
    assert len(ds.SegmentSequence) == 3 and int(ds.NumberOfFrames) >= 1
    masks = read_dicom_seg(out, series)
    assert list(masks) == ["WT", "TC", "ET"]
    assert all(m.shape == (SLICES, ROWS, COLS) and not m.any() for m in masks.values())


def test_omitted_empty_frames_read_back_the_same(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = glioma_case()
    out = write_dicom_seg(
        labels,
        series,
        tmp_path / "seg.dcm",
        label_set=GLIOMA,
        model_name="m",
        model_version="1",
        omit_empty_frames=True,
    )
    assert int(pydicom.dcmread(out).NumberOfFrames) < SLICES * 3
    masks = read_dicom_seg(out, series)
    for index, region in enumerate(GLIOMA.regions(labels)):
        np.testing.assert_array_equal(masks[GLIOMA.region_names[index]], region)


def test_post_treatment_regions_with_resection_cavity(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    post = get_label_set("glioma_post")
    labels = np.zeros((SLICES, ROWS, COLS), dtype=np.uint8)
    labels[4:7, 3:9, 4:12] = post.code("RC")
    labels[4:7, 10:14, 14:20] = post.code("SNFH")
    labels[5, 11:13, 15:18] = post.code("ET")
    out = write_dicom_seg(
        labels, series, tmp_path / "seg.dcm", label_set=post, model_name="m", model_version="2"
    )
    items = pydicom.dcmread(out).SegmentSequence
    assert [i.SegmentLabel for i in items] == [
        "WT whole tumour",
        "TC tumour core",
        "ET enhancing tumour",
        "RC resection cavity",
    ]
    assert items[3].SegmentedPropertyTypeCodeSequence[0].CodeValue == "245849007"
    masks = read_dicom_seg(out, series)
    for index, name in enumerate(post.region_names):
        np.testing.assert_array_equal(masks[name], post.regions(labels)[index], err_msg=name)


def test_every_region_of_every_label_set_has_codes() -> None:
    for name in ("glioma", "glioma_post", "pediatric"):
        label_set = get_label_set(name)
        for region in (*label_set.region_names, *label_set.label_names[1:]):
            category, prop_type = REGION_CODES[region]
            assert category.value == "49755003" and prop_type.value
            assert len(dicom_seg.segment_label(region)) <= 64


def test_wrong_shape_names_both_shapes(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = np.zeros((SLICES, COLS, ROWS), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(10, 24, 20\).*\(10, 20, 24\)") as info:
        write_dicom_seg(
            labels, series, tmp_path / "seg.dcm", label_set=GLIOMA, model_name="m", model_version="1"
        )
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_unknown_label_codes_are_refused(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    labels = glioma_case()
    labels[0, 0, 0] = 4
    with pytest.raises(ValueError, match=r"codes \[4\]"):
        write_dicom_seg(
            labels, series, tmp_path / "seg.dcm", label_set=GLIOMA, model_name="m", model_version="1"
        )


def test_a_failed_save_leaves_no_file(
    series: list[pydicom.Dataset], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"previous")

    def half_written(self: hd.seg.Segmentation, stream: object, **kwargs: object) -> None:
        stream.write(b"\0" * 128 + b"DICM")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_seg(glioma_case(), series, out, label_set=GLIOMA, model_name="m", model_version="1")
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]
    assert out.read_bytes() == b"previous"


def test_reader_refuses_another_series(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    out = write_dicom_seg(
        glioma_case(), series, tmp_path / "seg.dcm", label_set=GLIOMA, model_name="m", model_version="1"
    )
    other = [pydicom.dcmread(p, stop_before_pixels=True) for p in mr_series(tmp_path / "other")]
    with pytest.raises(ValueError, match=r"seg\.dcm references series") as info:
        read_dicom_seg(out, other)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="does not reference 1 of the 11"):
        read_dicom_seg(out, [*series, *other[:1]])
    # a subset of the slices reads back that subset, in the order given
    masks = read_dicom_seg(out, series[::-3])
    np.testing.assert_array_equal(masks["WT"], GLIOMA.regions(glioma_case())[0][::-3])


def test_reader_refuses_a_file_that_is_no_segmentation(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    image = mr_series(tmp_path / "mr", slices=1)[0]
    with pytest.raises(ValueError, match="is not a readable DICOM Segmentation"):
        read_dicom_seg(image, series)


def test_the_file_gets_the_usual_permissions(series: list[pydicom.Dataset], tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    out = write_dicom_seg(
        glioma_case(), series, tmp_path / "seg.dcm", label_set=GLIOMA, model_name="m", model_version="1"
    )
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
