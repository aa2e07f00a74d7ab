"""Out-of-core training data: what is said to be read from disk is, what is said to be cached is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tumorseg.data import case_store
from tumorseg.data.case_store import (
    CaseReader,
    NpzLayout,
    cached_bytes,
    choose_centre,
    crop_start,
    open_cases,
    save_case,
)
from tumorseg.data.datamodule import rank_shard
from tumorseg.errors import DataError


def _case(path: Path, shape: tuple[int, int, int] = (20, 24, 18), tumour: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(4, *shape)).astype(np.float16)
    label = np.zeros(shape, dtype=np.uint8)
    brain = np.zeros(shape, dtype=bool)
    brain[2:-2, 2:-2, 2:-2] = True
    if tumour:
        label[5:9, 6:11, 4:8] = 2
        label[6:8, 7:9, 5:7] = 3
    save_case(path, image=image, label=label, brain=brain, max_locations=50)
    return path


def test_a_patch_is_the_slice_of_the_stored_arrays(tmp_path: Path) -> None:
    path = _case(tmp_path / "A.npz")
    reader = CaseReader(path)
    with np.load(path) as npz:
        image, label = npz["image"], npz["label"]
    for start, size in (((0, 0, 0), (8, 8, 8)), ((12, 16, 10), (8, 8, 8)), ((3, 5, 7), (16, 4, 1))):
        patch_image, patch_label = reader.patch(start, size)
        window = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
        assert patch_image.dtype == np.float32 and patch_label.dtype == np.uint8
        np.testing.assert_array_equal(patch_image, image[(slice(None), *window)].astype(np.float32))
        np.testing.assert_array_equal(patch_label[0], label[window])


def test_member_offsets_are_found_without_reading_the_arrays(tmp_path: Path) -> None:
    path = _case(tmp_path / "A.npz")
    layout = NpzLayout(path)
    assert layout.members["image"].shape == (4, 20, 24, 18)
    assert layout.members["image"].dtype == np.float16
    # the image member's bytes start at the offset found: the file holds them verbatim
    raw = path.read_bytes()
    member = layout.members["image"]
    stored = np.frombuffer(raw[member.offset : member.offset + member.nbytes], dtype=np.float16)
    with np.load(path) as npz:
        np.testing.assert_array_equal(stored.reshape(member.shape), npz["image"])


def test_draws_never_load_a_whole_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = CaseReader(_case(tmp_path / "A.npz"))

    def no_whole_loads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a patch draw loaded a whole .npz")

    monkeypatch.setattr(np, "load", no_whole_loads)
    rng = np.random.RandomState(0)
    for _ in range(20):
        image, label = reader.draw(
            rng, (8, 8, 8), sampler="pos_neg", foreground_fraction=0.5, class_ratios=(1, 1, 1, 1)
        )
        assert image.shape == (4, 8, 8, 8) and image.flags.writeable and label.flags.writeable
    assert not reader.cached


def test_cached_cases_are_in_memory_and_the_rest_on_disk(tmp_path: Path) -> None:
    paths = [_case(tmp_path / f"C{i}.npz", seed=i) for i in range(4)]
    one = CaseReader(paths[0]).nbytes
    readers = open_cases(paths, cache_bytes=2 * one + one // 2)  # room for two cases, not three
    assert [r.cached for r in readers] == [True, True, False, False]
    assert cached_bytes(readers) == 2 * one
    # What is said to be cached really is: with the files gone, cached cases still give patches
    # and the others cannot.
    for path in paths:
        path.unlink()
    for reader in readers[:2]:
        image, label = reader.patch((0, 0, 0), (8, 8, 8))
        assert image.shape == (4, 8, 8, 8) and label.shape == (1, 8, 8, 8)
    with pytest.raises(FileNotFoundError):
        readers[2].patch((0, 0, 0), (8, 8, 8))


def test_no_budget_caches_nothing(tmp_path: Path) -> None:
    readers = open_cases([_case(tmp_path / "A.npz")], cache_bytes=0)
    assert not readers[0].cached and cached_bytes(readers) == 0


def test_centres_follow_the_sampler_and_patches_stay_inside(tmp_path: Path) -> None:
    reader = CaseReader(_case(tmp_path / "A.npz"))
    rng = np.random.RandomState(1)
    with np.load(reader.path) as npz:
        label, brain = npz["label"], npz["brain"]

    def centres(n: int, **how: object) -> list[tuple[int, int, int]]:
        return [choose_centre(reader.arrays(), reader.shape, rng, **how) for _ in range(n)]

    tumour_centres = centres(30, sampler="pos_neg", foreground_fraction=1.0, class_ratios=(1, 1, 1, 1))
    assert all(label[c] > 0 for c in tumour_centres)
    brain_centres = centres(30, sampler="pos_neg", foreground_fraction=0.0, class_ratios=(1, 1, 1, 1))
    assert all(label[c] == 0 and brain[c] for c in brain_centres)
    et_centres = centres(10, sampler="label_classes", foreground_fraction=0.5, class_ratios=(0, 0, 0, 1))
    assert all(label[c] == 3 for c in et_centres)
    for centre in tumour_centres + brain_centres:
        start = crop_start(centre, (16, 16, 16), reader.shape)
        assert all(0 <= a <= s - 16 for a, s in zip(start, reader.shape, strict=True))


def test_a_tumour_free_case_centres_on_brain(tmp_path: Path) -> None:
    reader = CaseReader(_case(tmp_path / "A.npz", tumour=False))
    rng = np.random.RandomState(0)
    centre = choose_centre(
        reader.arrays(),
        reader.shape,
        rng,
        sampler="pos_neg",
        foreground_fraction=1.0,
        class_ratios=(1, 1, 1, 1),
    )
    with np.load(reader.path) as npz:
        assert npz["brain"][centre]


def test_crop_start_matches_monai_centring() -> None:
    assert crop_start((10, 10, 10), (8, 8, 8), (40, 40, 40)) == (6, 6, 6)
    assert crop_start((1, 39, 20), (8, 8, 8), (40, 40, 40)) == (0, 32, 16)


def test_compressed_or_old_cases_are_one_line_errors(tmp_path: Path) -> None:
    shape = (10, 10, 10)
    arrays = {
        "image": np.zeros((4, *shape), np.float16),
        "label": np.zeros(shape, np.uint8),
        "brain": np.ones(shape, bool),
    }
    save_case(tmp_path / "Z.npz", **arrays, compress=True)
    with pytest.raises(DataError, match="compress_npz: false"):
        CaseReader(tmp_path / "Z.npz")
    np.savez(tmp_path / "Old.npz", **arrays)  # before sample locations existed
    with pytest.raises(DataError, match=r"lacks 'loc_fg'.*rerun `tumorseg preprocess`"):
        CaseReader(tmp_path / "Old.npz")
    (tmp_path / "Bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable preprocessed case"):
        CaseReader(tmp_path / "Bad.npz")


def test_sample_locations_are_bounded_and_repeatable() -> None:
    label = np.zeros((30, 30, 30), np.uint8)
    label[5:25, 5:25, 5:25] = 2  # 8000 voxels
    brain = np.ones_like(label, dtype=bool)
    first = case_store.sample_locations(label, brain, max_per_class=100, seed=3)
    again = case_store.sample_locations(label, brain, max_per_class=100, seed=3)
    assert set(first) == {"loc_fg", "loc_0", "loc_2"}
    for key in first:
        assert len(first[key]) == 100 and np.array_equal(first[key], again[key])
        assert len(np.unique(first[key], axis=0)) == 100  # without replacement


def test_each_ddp_rank_gets_its_own_shard() -> None:
    records = [{"case_id": str(i)} for i in range(5)]
    shards = [rank_shard(records, rank, 2) for rank in range(2)]
    assert [r["case_id"] for r in shards[0]] == ["0", "2", "4"]
    assert [r["case_id"] for r in shards[1]] == ["1", "3"]
    with pytest.raises(DataError, match="2 training cases for 3 DDP ranks"):
        rank_shard(records[:2], 0, 3)


def test_a_case_written_twice_is_the_same_bytes_and_loads_as_numpy_writes_it(tmp_path: Path) -> None:
    """numpy stamps .npz members with the current time; a rerun of preprocess would change every file and
    its DVC hash. Written 2 s apart (zip time resolution), the bytes are equal and np.load reads them."""
    import time

    first = _case(tmp_path / "a" / "Case1.npz")
    time.sleep(2.1)
    second = _case(tmp_path / "b" / "Case1.npz")
    assert first.read_bytes() == second.read_bytes()
    with np.load(first) as stored:
        assert set(stored.files) >= {"image", "label", "brain"} and stored["image"].dtype == np.float16
    for compress in (False, True):
        with (tmp_path / f"x{compress}.npz").open("wb") as fh:
            case_store.write_npz(fh, {"a": np.arange(5)}, compress=compress)
        with np.load(tmp_path / f"x{compress}.npz") as stored:
            assert stored["a"].tolist() == [0, 1, 2, 3, 4]
