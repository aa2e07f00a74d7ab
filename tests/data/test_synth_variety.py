"""The generator's variety: patchy and nodular enhancement, multifocal tumours and satellites, fuzzy
oedema, per-case contrasts, partial volume, coarser acquisitions and motion/ghosting artefacts.

Each feature is switched on or off through its ``synth`` key and compared with its twin (the same
case without it): the side streams make the twins identical wherever the feature does not act.
Cases are 3-4 mm (a fraction of a second each).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from tumorseg.config import SynthConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.synth import SyntheticCase, _contrast_table, synthesize_case

FULL_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: diagonal neighbours touch


def plain(**overrides: object) -> SynthConfig:
    """4 mm tumour cases, stored RAS, without coarser acquisitions or artefacts unless asked."""
    base: dict[str, object] = {
        "spacing_mm": 4.0,
        "tumour_free_fraction": 0.0,
        "reoriented_fraction": 0.0,
        "low_resolution_fraction": 0.0,
        "artefact_fraction": 0.0,
    }
    base.update(overrides)
    return SynthConfig(**base)


def _tc(case: SyntheticCase) -> np.ndarray:
    return np.isin(case.labels, (1, 3))


def _components(mask: np.ndarray) -> int:
    return int(ndi.label(mask, FULL_3D)[1])


# ---------------------------------------------------------------- determinism
def test_every_feature_on_is_deterministic_and_seed_dependent() -> None:
    cfg = plain(
        multifocal_fraction=1.0, satellite_fraction=1.0, artefact_fraction=1.0, low_resolution_fraction=1.0
    )
    a, b = synthesize_case(3, cfg), synthesize_case(3, cfg)
    assert a.info == b.info and a.info["artefacts"] and a.info["low_resolution"]
    assert np.array_equal(a.labels, b.labels)
    for m in CANONICAL_MODALITIES:
        assert a.images[m].tobytes() == b.images[m].tobytes(), m
    other = synthesize_case(3, cfg.model_copy(update={"seed": 43}))
    assert not np.array_equal(a.images["t1ce"], other.images["t1ce"])


# ---------------------------------------------------------------- tumour shape
def test_multifocal_tumours_have_separate_cores_and_single_ones_do_not() -> None:
    single = [synthesize_case(i, plain(satellite_fraction=0.0, multifocal_fraction=0.0)) for i in range(1, 5)]
    assert all(c.info["foci"] == 1 and c.info["satellites"] == 0 for c in single)
    assert all(_components(_tc(c)) == 1 for c in single)
    multi = [synthesize_case(i, plain(satellite_fraction=0.0, multifocal_fraction=1.0)) for i in range(1, 5)]
    assert all(c.info["foci"] in (2, 3) for c in multi)
    assert sum(_components(_tc(c)) > 1 for c in multi) >= 3
    for one, many in zip(single, multi, strict=True):  # the same main mass
        assert one.info["centre_mni_mm"] == many.info["centre_mni_mm"]


def test_satellites_are_small_nodules_outside_the_main_core() -> None:
    cases = [
        synthesize_case(i, plain(spacing_mm=3.0, satellite_fraction=1.0, multifocal_fraction=0.0))
        for i in range(1, 5)
    ]
    assert all(1 <= c.info["satellites"] <= 3 and c.info["foci"] == 1 for c in cases)
    with_nodules = 0
    for case in cases:
        components, n = ndi.label(_tc(case), FULL_3D)
        sizes = np.sort(np.bincount(components.ravel())[1:])[::-1]
        with_nodules += n > 1
        if n > 1:  # nodules of radius <= 4 mm: at most ~270 mm3, i.e. 10 voxels of 27 mm3
            assert sizes[1:].max() <= 16 and sizes[0] > 5 * sizes[1:].max()
    assert with_nodules >= 2


def test_patchy_rims_leave_non_enhancing_arcs_labelled_ncr() -> None:
    def rim_share(gap_max: float) -> list[float]:
        cfg = plain(
            spacing_mm=3.0, no_necrosis_fraction=0.0, nodular_fraction=0.0, enhancement_gap_max=gap_max
        )
        shares = []
        for i in range(1, 5):
            case = synthesize_case(i, cfg)
            rim = _tc(case) & ~ndi.binary_erosion(_tc(case))  # the core's outer voxels
            shares.append(float((case.labels[rim] == 1).mean()))
        return shares

    closed, patchy = rim_share(0.0), rim_share(0.9)
    assert max(closed) < 0.12
    assert max(patchy) > 0.25 and sum(patchy) > sum(closed) + 0.3


def test_nodular_tumours_are_mostly_non_enhancing_core() -> None:
    cases = [
        synthesize_case(i, plain(spacing_mm=3.0, no_necrosis_fraction=0.0, nodular_fraction=1.0))
        for i in range(1, 4)
    ]
    for case in cases:
        assert case.info["enhancement"] == "nodular"
        ncr, et, tc = case.labels == 1, case.labels == 3, _tc(case)
        assert ncr.sum() > 0.45 * tc.sum(), case.index
        wm = (case.tissue["wm"] > 0.9) & (case.labels == 0) & case.brain_mask
        assert case.images["t2"][ncr].mean() > 1.2 * case.images["t2"][wm].mean()  # solid, T2-bright
        if et.any():
            assert case.images["t1ce"][et].mean() > 1.5 * case.images["t1ce"][ncr].mean()


def test_solid_tumours_enhance_everywhere() -> None:
    cases = [synthesize_case(i, plain(no_necrosis_fraction=1.0, multifocal_fraction=1.0)) for i in (1, 2)]
    for case in cases:
        assert case.info["enhancement"] == "solid" and not case.has_necrosis
        assert np.array_equal(_tc(case), case.labels == 3)


# ---------------------------------------------------------------- label follows what is visible
def test_et_label_is_where_t1ce_enhances() -> None:
    """Within the tumour core, one T1ce threshold per case recovers the ET label (Dice > 0.85)."""
    cfg = plain(spacing_mm=3.0, no_necrosis_fraction=0.0, nodular_fraction=0.0, enhancement_gap_max=0.6)
    for i in range(1, 5):
        case = synthesize_case(i, cfg)
        et, ncr, tc = case.labels == 3, case.labels == 1, _tc(case)
        t1ce = case.images["t1ce"]
        threshold = 0.5 * (t1ce[et].mean() + t1ce[ncr].mean())
        predicted = tc & (t1ce > threshold)
        dice = 2.0 * (predicted & et).sum() / (predicted.sum() + et.sum())
        assert dice > 0.85, (i, dice)


def test_fuzzy_oedema_fades_beyond_its_label() -> None:
    """With a fuzzy border, FLAIR stays raised in white matter just outside the labelled tumour."""

    def shell_ratio(fuzziness: float) -> float:
        ratios = []
        for i in range(1, 5):
            case = synthesize_case(i, plain(oedema_fuzziness=fuzziness, contrast_jitter=0.0))
            wt = case.labels > 0
            shell = ndi.binary_dilation(wt, iterations=2) & ~wt & (case.tissue["wm"] > 0.8)
            far = (case.tissue["wm"] > 0.9) & ~ndi.binary_dilation(wt, iterations=8) & case.brain_mask
            ratios.append(case.images["flair"][shell].mean() / case.images["flair"][far].mean())
        return float(np.mean(ratios))

    sharp, fuzzy = shell_ratio(0.0), shell_ratio(0.6)
    assert sharp < 1.15 and fuzzy > sharp + 0.1


# ---------------------------------------------------------------- appearance
def _contrast_to_wm(case: SyntheticCase, modality: str) -> float:
    """GM/WM intensity ratio fitted over healthy voxels (image = sum of tissue share x level)."""
    healthy = case.brain_mask & (case.labels == 0)
    shares = np.stack([case.tissue[t][healthy] for t in ("gm", "wm", "csf")], axis=1)
    levels, *_ = np.linalg.lstsq(shares, case.images[modality][healthy], rcond=None)
    return float(levels[0] / levels[1])


def test_contrast_jitter_shifts_tumour_parts_but_never_swaps_them() -> None:
    """Per-case tables move the tumour against normal tissue, yet the part orderings that make each
    label visible hold in every case (FLAIR: NCR < NET < ED; T2: ED < NCR; T1ce: ED < ET; T1: NCR < NET),
    and non-enhancing tumour stays darker than oedema on all four sequences, by a few per cent in some
    cases (net_contrast_min) and by 15 % or more in others."""
    rng = np.random.default_rng(0)
    tables = [_contrast_table(rng, 0.15, 0.3) for _ in range(300)]
    pairs = [
        ("flair", "ncr", "net"),
        ("flair", "ncr", "ed"),
        ("t2", "ed", "ncr"),
        ("t1ce", "ed", "et"),
        ("t1ce", "net", "et"),
        ("t1", "ncr", "net"),
        ("t1", "ncr", "ed"),
    ]
    for m, lo, hi in pairs:
        assert all(t[m][hi] > t[m][lo] * 1.05 for t in tables), (m, lo, hi)
    gaps = np.array([[np.log(t[m]["ed"] / t[m]["net"]) for m in CANONICAL_MODALITIES] for t in tables])
    assert gaps.min() > 0.0 and gaps.mean(axis=1).min() < 0.06 and gaps.mean(axis=1).max() > 0.15
    # the shared factor: oedema brighter than grey matter on FLAIR by 1.1x in some cases, 1.7x in others
    ed_to_gm = np.array([t["flair"]["ed"] / t["flair"]["gm"] for t in tables])
    assert ed_to_gm.min() < 1.15 and ed_to_gm.max() > 1.7, (ed_to_gm.min(), ed_to_gm.max())
    # net_contrast_min 1: the full gap, at least half the base table's
    full = [_contrast_table(rng, 0.15, 1.0) for _ in range(100)]
    assert all(t["flair"]["ed"] > t["flair"]["net"] * np.exp(0.14) for t in full)


@pytest.mark.parametrize(("jitter", "low", "high"), [(0.0, 0.0, 0.05), (0.1, 0.08, 1.0)])
def test_contrast_ratios_differ_between_cases_by_contrast_jitter(
    jitter: float, low: float, high: float
) -> None:
    cfg = plain(tumour_free_fraction=1.0, noise_level=0.0, bias_field_strength=0.0, contrast_jitter=jitter)
    cases = [synthesize_case(i, cfg) for i in range(1, 5)]
    spreads = []
    for m in ("t1", "t2", "flair"):
        ratios = np.array([_contrast_to_wm(c, m) for c in cases])
        spreads.append((ratios.max() - ratios.min()) / ratios.mean())
    assert low <= max(spreads) < high, spreads


def test_partial_volume_changes_the_border_only_and_keeps_the_labels() -> None:
    kw = {
        "spacing_mm": 3.0,
        "no_necrosis_fraction": 1.0,
        "satellite_fraction": 0.0,
        "multifocal_fraction": 0.0,
    }
    for i in (1, 2):
        mixed, hard = synthesize_case(i, plain(**kw)), synthesize_case(i, plain(**kw, partial_volume=False))
        tc = _tc(mixed)
        assert np.array_equal(tc, _tc(hard))  # the label is the voxel centre's, either way
        diff = np.abs(mixed.images["t1ce"] - hard.images["t1ce"])
        border = ndi.binary_dilation(tc) & ~ndi.binary_erosion(tc)
        deep = ndi.binary_erosion(tc, iterations=2)
        assert deep.any() and diff[border].mean() > 5.0 * diff[deep].mean() + 1.0


# ---------------------------------------------------------------- acquisition
def _twins(**feature: float) -> list[tuple[SyntheticCase, SyntheticCase]]:
    return [(synthesize_case(i, plain(**feature)), synthesize_case(i, plain())) for i in range(1, 4)]


def test_ghosts_are_shifted_copies_along_the_phase_encode_axis() -> None:
    ghosted = 0
    for case, clean in _twins(artefact_fraction=1.0):
        assert np.array_equal(case.labels, clean.labels)
        assert case.info["artefacts"] and not clean.info["artefacts"]
        for m in CANONICAL_MODALITIES:
            kinds = case.info["artefacts"].get(m, [])
            same = np.array_equal(case.images[m], clean.images[m])
            assert same == (not kinds), (case.index, m)
            if kinds != ["ghost"]:
                continue
            # The difference is the clean head moved by N/2, N/3 or N/4 along x or y.
            brain = case.brain_mask
            diff = (case.images[m] - clean.images[m])[brain]
            best = max(
                np.corrcoef(diff, np.roll(clean.images[m], n // fold, axis=axis)[brain])[0, 1]
                for axis, n in enumerate(case.shape[:2])
                for fold in (2, 3, 4)
            )
            assert best > 0.7, (case.index, m, best)
            ghosted += 1
    assert ghosted >= 1


def test_coarser_acquisitions_are_smoother_and_touch_only_their_sequences() -> None:
    for case, clean in _twins(low_resolution_fraction=1.0):
        assert case.info["low_resolution"]
        for m in CANONICAL_MODALITIES:
            if m not in case.info["low_resolution"]:
                assert np.array_equal(case.images[m], clean.images[m]), (case.index, m)
                continue
            inner = ndi.binary_erosion(case.brain_mask, iterations=2)
            detail = np.abs(ndi.laplace(case.images[m]))[inner].mean()
            assert detail < 0.97 * np.abs(ndi.laplace(clean.images[m]))[inner].mean(), (case.index, m)


def test_anisotropic_cases_blur_the_tumour_across_slices() -> None:
    # The same tumour on thick slices with and without partial volume: the slice profile spreads
    # enhancement into the slices above and below the labelled core.
    kw = {
        "anisotropic_fraction": 1.0,
        "spacing_mm": 2.0,
        "no_necrosis_fraction": 1.0,
        "satellite_fraction": 0.0,
    }
    case, hard = synthesize_case(1, plain(**kw)), synthesize_case(1, plain(**kw, partial_volume=False))
    assert case.spacing[2] > case.spacing[0]
    tc = _tc(case)
    above_below = (np.roll(tc, 1, axis=2) | np.roll(tc, -1, axis=2)) & ~tc
    assert case.images["t1ce"][above_below].mean() > 1.02 * hard.images["t1ce"][above_below].mean()


# ---------------------------------------------------------------- shares
def test_shares_of_multifocal_artefact_and_coarse_cases_follow_the_keys() -> None:
    cfg = plain(spacing_mm=4.0, multifocal_fraction=0.25, artefact_fraction=0.5, low_resolution_fraction=0.25)
    cases = [synthesize_case(i, cfg) for i in range(1, 13)]
    assert abs(sum(c.info["foci"] > 1 for c in cases) - 3) <= 1
    assert abs(sum(bool(c.info["artefacts"]) for c in cases) - 6) <= 1
    assert abs(sum(bool(c.info["low_resolution"]) for c in cases) - 3) <= 1


def test_noise_level_varies_between_cases_by_noise_jitter() -> None:
    measured, factors = [], []
    for i in range(1, 4):
        noisy = synthesize_case(i, plain(noise_jitter=1.0))
        # The same draws with negligible noise: the difference is the case's noise alone.
        clean = synthesize_case(i, plain(noise_jitter=1.0, noise_level=1e-6))
        assert noisy.info["noise_factor"] == clean.info["noise_factor"]
        wm = (clean.tissue["wm"] > 0.9) & (clean.labels == 0) & clean.brain_mask
        relative = float((noisy.images["t1"] - clean.images["t1"])[wm].std() / clean.images["t1"][wm].mean())
        factors.append(noisy.info["noise_factor"])
        measured.append(relative)
        assert 0.7 < relative / (0.03 * factors[-1]) < 1.35, (i, relative, factors[-1])
    assert max(factors) / min(factors) > 1.3
    assert synthesize_case(1, plain(noise_jitter=0.0)).info["noise_factor"] == 1.0
