"""The ``tumorseg`` command line.

Every sub-command reads params.yaml (``--params``) and calls the same package function as its DVC
stage and Prefect task. Heavy libraries are imported inside the handlers so ``tumorseg --help`` stays
instant. User errors (:class:`~tumorseg.errors.TumorsegError`) print one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg import faults
from tumorseg.config import DATASET_LAYOUTS as LAYOUT_NAMES
from tumorseg.data.conventions import LABEL_CONVENTIONS
from tumorseg.errors import ConfigError, TumorsegError, disk_full, is_disk_full

if TYPE_CHECKING:
    from tumorseg.params import Params

LABEL_CONVENTION_NAMES: tuple[str, ...] = tuple(LABEL_CONVENTIONS)

Handler = Callable[[argparse.Namespace], int | None]


def _overrides(args: argparse.Namespace, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``-S KEY=VALUE`` overrides, then the command's own options (``--cases 8``) as params.yaml keys on
    top, so both go through the same typed validation. Flows read params.yaml and carry only these."""
    from tumorseg.config import parse_override

    overrides = dict(parse_override(o) for o in args.set or [])
    overrides.update({k: v for k, v in (options or {}).items() if v is not None})
    return overrides


def _params(
    args: argparse.Namespace, options: dict[str, Any] | None = None, *, outside_project: bool = False
) -> Any:
    """params.yaml with :func:`_overrides` applied, every section validated (a ``Params``).

    ``outside_project``: with no ./params.yaml (and none given) every section is at its defaults, so a
    checkpoint or MLflow URI still works outside a project.
    """
    from tumorseg.config import apply_overrides
    from tumorseg.params import from_mapping, load_params

    overrides = _overrides(args, options)
    if outside_project and args.params == "params.yaml" and not Path(args.params).is_file():
        return from_mapping(apply_overrides({}, overrides))
    return load_params(args.params, overrides)


def _dims_paths(args: argparse.Namespace, params: Params) -> dict[str, str]:
    """The folders of ``--dims``' dataset: ``paths.ingested`` ... or their ``_2d`` twins."""
    paths = params.paths
    suffix = "_2d" if getattr(args, "dims", 3) == 2 else ""
    return {key: getattr(paths, key + suffix) for key in ("ingested", "validated", "preprocessed", "split")}


# ---------------------------------------------------------------- the parser as a table
Arg = tuple[tuple[str, ...], dict[str, Any]]
"""One ``add_argument`` call as data (flags, options), so :func:`build_parser` is a short loop."""


def _arg(*flags: str, **options: Any) -> Arg:
    """An :data:`Arg` written like the ``add_argument`` call it stands for."""
    return flags, options


@dataclass(frozen=True)
class Command:
    """One sub-command; ``help`` is also its ``--help`` description."""

    name: str
    handler: Handler
    help: str
    args: tuple[Arg, ...] = ()


COMMANDS: list[Command] = []
"""Every sub-command in ``tumorseg --help`` order (the order of the handlers below), with its arguments
after :data:`COMMON_ARGS`."""


def _command(name: str, help: str, *args: Arg) -> Callable[[Handler], Handler]:
    """Declare the decorated handler as sub-command ``name``, its arguments beside the code reading them."""

    def declare(handler: Handler) -> Handler:
        COMMANDS.append(Command(name, handler, help, args))
        return handler

    return declare


COMMON_ARGS: tuple[Arg, ...] = (
    _arg("--params", default="params.yaml", help="params file (default: %(default)s)"),
    _arg("-S", "--set", action="append", metavar="KEY=VALUE", help="override a params.yaml key (repeatable)"),
)
"""The options every sub-command takes first."""

_NO_REGISTER = _arg("--no-register", action="store_true", help="write the reports only; register no version")
_DIMS = _arg(
    "--dims",
    type=int,
    choices=[2, 3],
    default=3,
    help="the dataset: 3 volumes (data.source, paths.*), 2 images (data.source_2d, paths.*_2d) (default: 3)",
)
_LABELS = ["auto", *LABEL_CONVENTION_NAMES]
_SEG_LABELS = "label convention of the seg files"
_STORE = "store_true"


# ---------------------------------------------------------------- sub-commands
@_command(
    "synth",
    "Generate realistic synthetic multi-modal brain MRI with gliomas.",
    _arg(
        "--layout",
        choices=[*LAYOUT_NAMES, "figshare", "kaggle"],
        help="dataset layout to write (figshare, kaggle: 2-D slices, params.yaml synth_2d)",
    ),
    _arg("--labels", choices=_LABELS, help=f"{_SEG_LABELS} (default: synth.labels; auto: the layout's)"),
    _arg("--cases", type=int, help="number of cases (figshare: patients; kaggle: images)"),
    _arg("--seed", type=int, help="random seed (output is deterministic for a seed)"),
    _arg("--spacing", type=float, metavar="MM", help="voxel spacing in mm (1 = BraTS size)"),
    _arg("--out", help="output folder (default: data/synth; 2-D: data/synth_2d/<layout>)"),
    _arg(
        "--generator",
        choices=["embedded", "independent", "dicom"],
        default="embedded",
        help="independent: the generalisation set (generalise.*), made by other code on purpose: three 3-D "
        "layouts into generalise.data, or with --dims 2 .mat slices and yes/no images into generalise.data_2d; "
        "dicom: heads with skull and scalp written as DICOM MR studies (dicom.studies.*), truth beside them",
    ),
    _DIMS,
)
def _cmd_synth(args: argparse.Namespace) -> int | None:
    from tumorseg.config import GENERATED_FOLDERS, SYNTH_SOURCE, DataConfig
    from tumorseg.data.source import project_root

    if args.generator == "independent":
        return _synth_independent(args)
    if args.generator == "dicom":
        from tumorseg.dicom.study_synth import synth_studies

        params = _params(args, {"dicom.studies.studies": args.cases, "dicom.studies.seed": args.seed})
        out = Path(args.out) if args.out else project_root(args.params) / params.dicom.studies.out
        written = synth_studies(params, out)
        print(f"wrote {len(written)} DICOM studies to {out} (truth: {out / 'truth'})")
        return None

    if args.layout in ("figshare", "kaggle"):  # 2-D slices; --cases: Figshare patients or Kaggle images
        from tumorseg.data.planar_synth import synthesize_planar_dataset

        count_key = "synth_2d.figshare_patients" if args.layout == "figshare" else "synth_2d.kaggle_images"
        options = {count_key: args.cases, "synth_2d.seed": args.seed, "synth_2d.spacing_mm": args.spacing}
        planar_cfg = _params(args, options).synth_2d
        default_out = DataConfig.folder_for(GENERATED_FOLDERS[2], project_root(args.params)) / args.layout
        out = Path(args.out or default_out)
        written = synthesize_planar_dataset(out, args.layout, planar_cfg)
        print(f"wrote {len(written)} {args.layout} files to {out}")
        return None
    from tumorseg.data.synth import synthesize_dataset

    options = {
        "synth.layout": args.layout,
        "synth.labels": args.labels,
        "synth.cases": args.cases,
        "synth.seed": args.seed,
        "synth.spacing_mm": args.spacing,
    }
    cfg = _params(args, options).synth
    out = Path(args.out) if args.out else DataConfig.folder_for(SYNTH_SOURCE, project_root(args.params))
    print(f"wrote {len(synthesize_dataset(out, cfg))} {cfg.layout} cases to {out}")


def _synth_independent(args: argparse.Namespace) -> None:
    """``tumorseg synth --generator independent``: the generalisation set (docs/independent-set.md)."""
    from tumorseg.data.independent import synthesize_independent, synthesize_independent_2d
    from tumorseg.data.source import project_root

    cfg = _params(args).generalise
    root = project_root(args.params)
    seed = cfg.seed if args.seed is None else args.seed
    spacing = args.spacing or cfg.spacing_mm
    if args.dims == 2:
        out = Path(args.out) if args.out else root / cfg.data_2d
        patients = args.cases or cfg.figshare_patients
        written = synthesize_independent_2d(
            out,
            patients=patients,
            slices_per_patient=4,
            kaggle_images=cfg.kaggle_images,
            seed=seed,
            spacing_mm=spacing,
        )
        print(f"wrote {len(written)} independent 2-D files to {out}")
        return
    out = Path(args.out) if args.out else root / cfg.data
    ids = synthesize_independent(out, cases=args.cases or cfg.cases, seed=seed, spacing_mm=spacing)
    print(f"wrote {len(ids)} independent cases (brats2023, brats2021, nnunet sub-folders) to {out}")


@_command(
    "source",
    "Make data.source (--dims 2: data.source_2d) ready: generate the embedded dataset (synth) into "
    "data/synth (data/synth_2d), or check a dataset folder (read only) before any stage writes.",
    _DIMS,
)
def _cmd_source(args: argparse.Namespace) -> int | None:
    from tumorseg.data.source import prepare_source

    print(prepare_source(_params(args), args.params, args.dims).one_line())


@_command(
    "figure-cases",
    "Plot a few cases: 4 modalities and the label overlay (PNG).",
    _arg("src", help="a brats2021 or brats2023 folder, e.g. from `tumorseg synth`"),
    _arg("--out", required=True, help="PNG file to write"),
    _arg("--cases", type=int, default=4, help="number of tumour cases to show (default: %(default)s)"),
    _arg("--layout", choices=["brats2021", "brats2023"], default="brats2021"),
)
def _cmd_figure_cases(args: argparse.Namespace) -> int | None:
    from tumorseg.data.figures import plot_synthetic_cases

    out = plot_synthetic_cases(Path(args.src), Path(args.out), n_cases=args.cases, layout=args.layout)
    print(f"wrote {out}")


@_command(
    "ingest",
    "Index a BraTS 2020/21, BraTS 2023+, MSD, Figshare (.mat) or Kaggle (yes/, no/) folder into a manifest.",
    _arg("src", nargs="?", help="dataset folder (default: data.source; --dims 2: data.source_2d)"),
    _arg("--out", help="output folder for manifest.csv (default: paths.ingested)"),
    _DIMS,
    _arg("--layout", choices=["auto", *LAYOUT_NAMES], help="skip detection (default: ingest.layout)"),
    _arg(
        "--labels",
        choices=_LABELS,
        help=f"{_SEG_LABELS} (default: ingest.labels; auto: layout, BraTS prefix, dataset.json)",
    ),
)
def _cmd_ingest(args: argparse.Namespace) -> int | None:
    from tumorseg.data.ingest import ingest
    from tumorseg.data.source import inspect_source, source_folder

    params = _params(args, {"ingest.layout": args.layout, "ingest.labels": args.labels})
    cfg = params.ingest
    out = Path(args.out or _dims_paths(args, params)["ingested"])
    src = Path(args.src) if args.src else source_folder(params, args.params, args.dims)
    if not args.src:
        # a wrong data.source: one line naming it, before anything is written
        inspect_source(src, layout=cfg.layout, labels=cfg.labels, dims=args.dims)
    print(ingest(src, out, cfg).one_line())


@_command(
    "export",
    "Write the ingested cases as an nnU-Net raw dataset or a MONAI datalist (with the split).",
    _arg("--format", required=True, choices=["nnunet", "monai"], help="what to write"),
    _arg("--out", required=True, help="folder to write DatasetXXX_Name/ or datalist.json into"),
    _arg("--dataset-id", type=int, default=501, help="nnU-Net dataset id (default: %(default)s)"),
    _arg("--name", default="Tumorseg", help="nnU-Net dataset name (default: %(default)s)"),
    _arg("--force", action=_STORE, help="replace an existing export"),
)
def _cmd_export(args: argparse.Namespace) -> int | None:
    from tumorseg.data.export import export_from_params

    target = export_from_params(
        _params(args),
        Path(args.out),
        args.format,
        source=args.params,
        dataset_id=args.dataset_id,
        name=args.name,
        force=args.force,
    )
    print(f"exported ({args.format}) -> {target}")


@_command(
    "validate",
    "Validate an ingested dataset with Great Expectations; quarantine bad cases.",
    _arg("dir", nargs="?", help="ingested folder holding manifest.csv (default: paths.ingested)"),
    _arg("--out", help="write the validated manifest and reports here (default: in place)"),
    _arg("--max-invalid-fraction", type=float, metavar="F", help="fail above this share of bad cases"),
    _DIMS,
)
def _cmd_validate(args: argparse.Namespace) -> int | None:
    from tumorseg.validation.suite import validate_dataset

    params = _params(args, {"validate.max_invalid_fraction": args.max_invalid_fraction})
    src = Path(args.dir or _dims_paths(args, params)["ingested"])
    out = Path(args.out) if args.out else src
    print(validate_dataset(src, out, params.validate, planar_cfg=params.validate_2d).one_line())


@_command(
    "preprocess",
    "Reorient, resample, crop and normalise valid cases.",
    _arg("src", nargs="?", help="validated folder holding manifest.csv (default: paths.validated)"),
    _arg("--out", help="output folder (default: paths.preprocessed)"),
    _DIMS,
)
def _cmd_preprocess(args: argparse.Namespace) -> int | None:
    from tumorseg.data.preprocess import preprocess_dataset

    params = _params(args)
    paths = _dims_paths(args, params)
    src, out = Path(args.src or paths["validated"]), Path(args.out or paths["preprocessed"])
    print(preprocess_dataset(src, out, params.preprocess, params.preprocess_2d).one_line())


@_command(
    "split",
    "Patient-level stratified train/val/test split.",
    _arg("src", nargs="?", help="preprocessed folder (default: paths.preprocessed)"),
    _arg("--out", help="split JSON file (default: paths.split)"),
    _DIMS,
)
def _cmd_split(args: argparse.Namespace) -> int | None:
    from tumorseg.data.split import make_split

    params = _params(args)
    paths = _dims_paths(args, params)
    src, out = Path(args.src or paths["preprocessed"]), Path(args.out or paths["split"])
    print(make_split(src, out, params.split).one_line())


@_command(
    "evaluate",
    "Score predictions against references with each BraTS challenge's metrics.",
    _arg("--pred", required=True, help="folder of <case_id>.nii.gz predictions"),
    _arg("--ref", required=True, help="folder of <case_id>.nii.gz reference segmentations"),
    _arg("--out", required=True, help="per-case CSV to write (summary JSON and plots go beside it)"),
    _arg(
        "--labels",
        choices=_LABELS,
        help="label convention: its regions, lesion-wise rules and HD95 penalty (default: evaluate.labels)",
    ),
    _arg("--summary", help="summary JSON path (default: <out>.summary.json)"),
    _arg("--case-info", help="CSV with case_id,tumour_type for per-type statistics"),
    _arg("--images", help="folder of images (any layout) to draw overlays on"),
    _arg("--no-plots", action=_STORE, help="skip the PNG figures"),
)
def _cmd_evaluate(args: argparse.Namespace) -> int | None:
    from tumorseg.evaluation.evaluate import evaluate_folders

    result = evaluate_folders(
        Path(args.pred),
        Path(args.ref),
        Path(args.out),
        labels=args.labels,
        cfg=_params(args).evaluate,
        summary_path=args.summary,
        case_info=args.case_info,
        images_dir=args.images,
        make_plots=False if args.no_plots else None,
    )
    print(result.one_line())


@_command(
    "train",
    "Train a segmentation network (Lightning + MONAI), tracked in MLflow; --dims 2: the 2-D "
    "segmenter + tumour classifier (model_2d, train_2d).",
    _arg("--resume", action=_STORE, help="continue from train.out_dir/checkpoints/last.ckpt"),
    _arg(
        "--init-from",
        metavar="URI",
        help="start from this model's weights: models:/tumorseg@champion, models:/NAME/3, runs:/ID/model, "
        "an MLflow model folder or a best.ckpt (train.init_from; its network settings are used)",
    ),
    _DIMS,
)
def _cmd_train(args: argparse.Namespace) -> int | None:
    from tumorseg.training.train import train
    from tumorseg.tuning.best import with_best_params

    if args.init_from and args.dims == 2:
        raise ConfigError(
            "--init-from starts a 3-D model from another; the 2-D segmenter and classifier train from scratch"
        )
    params = _params(args, {"train.init_from": args.init_from})
    # params.yaml < the dims' best-params file (tune.best_params_file or best_params_file_2d) < -S
    params = with_best_params(params, explicit=_overrides(args), source=args.params, dims=args.dims)
    print(train(params, dims=args.dims, resume=args.resume, source=args.params).one_line())


@_command(
    "import-dicom",
    "DICOM studies (a folder or zip, several series each) to BraTS-ready cases: series classified and "
    "picked, T1/T2/FLAIR co-registered to T1ce, N4, 1 mm, brain extracted; transforms kept for the way back.",
    _arg("source", help="a folder (searched recursively) or .zip of DICOM files, one or more studies"),
    _arg("--out", required=True, help="dataset folder: one brats2021 case folder per study"),
    _arg(
        "--brain-model",
        help="brain-extraction model URI or checkpoint, or mni152 for nilearn's MNI152 mask (default: dicom.brain.model)",
    ),
)
def _cmd_import_dicom(args: argparse.Namespace) -> int | None:
    from tumorseg.dicom.brain import load_brain_extractor
    from tumorseg.dicom.prepare import import_dicom
    from tumorseg.tracking import params_tracking_uri

    params = _params(args, outside_project=True)
    brain = load_brain_extractor(
        args.brain_model or params.dicom.brain.model,
        tracking_uri=params_tracking_uri(params, source=args.params),
    )
    cases = import_dicom(args.source, args.out, params.dicom, brain)
    for case in cases:
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in case.seconds.items())
        print(f"{case.case_id}: {steps}")
    print(f"imported {len(cases)} studies -> {args.out}")


@_command(
    "train-brain",
    "Train the brain-extraction network on generated heads (dicom.brain.*) and register it in MLflow "
    "(alias champion): what import-dicom strips the skull with, nothing downloaded.",
    _arg("--no-register", action="store_true", help="train and write the checkpoint only"),
)
def _cmd_train_brain(args: argparse.Namespace) -> int | None:
    from tumorseg.dicom.brain import train_brain_extractor
    from tumorseg.tracking import params_tracking_uri

    params = _params(args)
    report = train_brain_extractor(
        params, tracking_uri=params_tracking_uri(params, source=args.params), register=not args.no_register
    )
    print(report.one_line())


@_command(
    "dicom-check",
    "Measure the DICOM path on generated studies the models never saw: series classification, "
    "registration error, brain-extraction Dice, DICOM-in -> DICOM-SEG Dice against the same model on the "
    "BraTS-ready NIfTI, seconds per step: <dicom.report>/dicom_check.{json,md}.",
    _arg(
        "--studies",
        help="folder of generated studies with truth/ (default: dicom.studies.out, made if missing)",
    ),
    _arg("--model", help="tumour model URI (default: predict.model)"),
)
def _cmd_dicom_check(args: argparse.Namespace) -> int | None:
    from tumorseg.data.source import project_root
    from tumorseg.dicom.check import run_dicom_check

    params = _params(args)
    root = project_root(args.params)
    studies = Path(args.studies) if args.studies else root / params.dicom.studies.out
    report = run_dicom_check(
        params, studies, root / params.dicom.report, model_uri=args.model, source=args.params
    )
    print(report["one_line"])


@_command(
    "compare",
    "Train every compare.systems entry (network, loss, pre-processing) with one budget and score each on "
    "the held-out test split: reports/compare/compare.md (Dice with CIs, HD95, time, parameters).",
)
def _cmd_compare(args: argparse.Namespace) -> int | None:
    from tumorseg.comparison.compare import run_comparison

    print(run_comparison(_params(args), source=args.params).one_line())


@_command(
    "predict",
    "Segment cases in any layout; writes <case_id>.nii.gz in each input's geometry and label convention.",
    _arg(
        "input",
        help="a dataset folder (BraTS 2021, BraTS 2023+, MSD, nnU-Net raw, MONAI datalist) or one case "
        "folder; a DICOM study folder or zip (writes <case_id>_seg.dcm, a DICOM-SEG, and <case_id>_t1ce.nii.gz "
        "in the T1ce series' geometry); or 2-D .mat/image files (a file or a folder of them: writes <case_id>_mask.png, 0/255, "
        "at each input's size)",
    ),
    _arg("--out", required=True, help="output folder for <case_id>.nii.gz"),
    _arg(
        "--model",
        help="checkpoint path or MLflow model URI: models:/tumorseg@champion (default: predict.model), "
        "models:/tumorseg/3, runs:/<run_id>/model; 2-D input: models:/tumorseg-2d@champion (predict_2d.model)",
    ),
    _arg("--layout", choices=["auto", *LAYOUT_NAMES], help="skip layout detection"),
    _arg("--labels", choices=_LABELS, help="input label convention, also the output's (default: detected)"),
    _arg("--tta", action=argparse.BooleanOptionalAction, help="mirror test-time augmentation"),
    _arg("--min-component-mm3", type=float, metavar="MM3", help="drop smaller tumour components"),
    _arg(
        "--min-component-confidence",
        type=float,
        metavar="P",
        help="drop tumour components whose mean probability is below P (0 keeps all; default: the model's own)",
    ),
    _arg("--probabilities", action=_STORE, help="also write probabilities/<case_id>.nii.gz"),
    _arg("--uncertainty", action=_STORE, help="also write uncertainty/<case_id>.nii.gz (needs --tta)"),
    _arg("--device", choices=["auto", "cpu", "cuda"], help="inference device (default: predict.device)"),
    _arg(
        "--engine",
        choices=["auto", "torch", "onnx"],
        help="auto: ONNX Runtime without torch when the model has network.onnx and no option needs torch "
        "(default: predict.engine)",
    ),
    _arg("--volumes", metavar="CSV", help="also write the per-case region volumes (ml) to this CSV"),
)
def _cmd_predict(args: argparse.Namespace) -> int | None:
    from tumorseg.runtime import import_nibabel_without_pydicom

    import_nibabel_without_pydicom()  # NIfTI in, NIfTI out: 0.1 s less start-up
    from tumorseg.data.readers import IMAGE, input_dims
    from tumorseg.registry.predict import predict_folder

    if input_dims(args.input) == IMAGE:  # .mat / image files: the 2-D models
        return _predict_planar(args)
    from tumorseg.dicom.outputs import looks_like_dicom

    dicom = looks_like_dicom(args.input)
    options = {
        "predict.tta": args.tta,
        "predict.min_component_mm3": args.min_component_mm3,
        "predict.min_component_confidence": args.min_component_confidence,
        "predict.probabilities": True if args.probabilities else None,
        "predict.uncertainty": True if args.uncertainty else None,
        "predict.device": args.device,
        "predict.engine": args.engine,
    }
    params = _params(args, options, outside_project=True)
    volumes: list[dict[str, Any]] = []

    def show(prediction: Any, files: list[Path]) -> None:
        print(f"{prediction.case_id}: {prediction.volumes_text()} -> {files[0]}", flush=True)
        row = {f"{r}_ml": round(v, 3) for r, v in prediction.volumes_ml.items()}
        volumes.append({"case_id": prediction.case_id, **row})

    if dicom:
        from tumorseg.dicom.outputs import predict_dicom

        result = predict_dicom(
            args.input, args.out, params, model_uri=args.model, source=args.params, on_case=show
        )
        run = result.run
    else:
        run = predict_folder(
            args.input,
            args.out,
            params,
            model_uri=args.model,
            layout=args.layout,
            labels=None if args.labels in (None, "auto") else args.labels,
            source=args.params,
            on_case=show,
        )
    if args.volumes:
        import pandas as pd

        from tumorseg.data.manifest import atomic_write_text

        atomic_write_text(args.volumes, pd.DataFrame(volumes).to_csv(index=False))
    for line in run.drift_lines():
        print(line)
    print(run.one_line())


def _load_planar(args: argparse.Namespace, default_key: str) -> Any:
    """The ``--model`` 2-D model, else ``predict_2d.<default_key>``; a missing input is reported first."""
    from tumorseg.data.readers import image_inputs
    from tumorseg.registry.loading import load_planar_model
    from tumorseg.tracking import params_tracking_uri

    image_inputs(args.input)
    params = _params(args, outside_project=True)
    uri = params_tracking_uri(params, source=args.params)
    return load_planar_model(args.model or getattr(params.predict_2d, default_key), tracking_uri=uri)


def _predict_planar(args: argparse.Namespace) -> int | None:
    from tumorseg.models.predictor import predict_images
    from tumorseg.registry.predict import PlanarDriftChecks

    model = _load_planar(args, "model")
    drift = PlanarDriftChecks(model, _params(args, outside_project=True), args.input)

    def show(prediction: Any, path: Path) -> None:
        kind = f", {prediction.tumour_type}" if prediction.tumour_type else ""
        print(f"{prediction.case_id}: tumour p={prediction.probability:.3f}{kind} -> {path}", flush=True)
        drift.check(prediction)

    try:
        results = predict_images(args.input, args.out, model, on_image=show)
    finally:
        drift.write(Path(args.out))
    for line in drift.lines():
        print(line)
    print(f"segmented {len(results)} 2-D images with {model.description} -> {args.out}; {drift.one_line()}")


@_command(
    "evaluate-model",
    "Evaluate the trained model on the test split in the source geometry; log it and register a "
    "challenger (--dims 2: choose the detector on validation, register tumorseg-2d and tumorseg-detect).",
    _arg("--checkpoint", help="checkpoint to evaluate (default: <train.out_dir>/checkpoints/best.ckpt)"),
    _NO_REGISTER,
    _DIMS,
)
def _cmd_evaluate_model(args: argparse.Namespace) -> int | None:
    from tumorseg.registry.evaluate_stage import evaluate_planar, run_evaluate_stage

    run = evaluate_planar if args.dims == 2 else run_evaluate_stage
    register = False if args.no_register else None
    result = run(_params(args), checkpoint=args.checkpoint, source=args.params, register=register)
    print(result.one_line())


@_command(
    "generalise",
    "Score the champion (--dims 2: the 2-D champion) on a dataset it was not generated for: by default "
    "the independent set (generalise.data); writes generalisation.json and a per-case CSV.",
    _arg("--data", help="dataset folder (default: generalise.data; --dims 2: generalise.data_2d)"),
    _arg("--model", help="model URI or checkpoint (default: predict.model; --dims 2: predict_2d.model)"),
    _arg("--out", help="report folder (default: paths.reports; --dims 2: paths.reports_2d)"),
    _DIMS,
)
def _cmd_generalise(args: argparse.Namespace) -> int | None:
    from tumorseg.registry.generalise import generalise, one_line

    report = generalise(
        _params(args),
        dims=args.dims,
        data=args.data,
        out_dir=args.out,
        model_uri=args.model,
        source=args.params,
    )
    print(one_line(report))


@_command(
    "promote",
    "Promote the challenger to champion if it beats it on the same test cases (registry.* gate).",
    _arg("--rollback", action=_STORE, help="restore the previous champion instead"),
    _arg("--name", help="model name (default: registry.model_name), e.g. tumorseg-2d, tumorseg-detect"),
    _arg("--out", help="decision JSON to write (default: <paths.reports>/promotion.json)"),
    _DIMS,
)
def _cmd_promote(args: argparse.Namespace) -> int | None:
    from tumorseg.registry.promote import promote, promote_planar

    if args.dims == 2 and not args.name:  # images: the segmenter, then the detector, in one report
        params = _params(args)
        results = promote_planar(params, report_file=args.out, rollback=args.rollback, source=args.params)
    else:
        params = _params(args, {"registry.model_name": args.name})
        results = [promote(params, rollback=args.rollback, source=args.params, report_file=args.out)]
    for result in results:
        print("\n".join(result.lines()))


@_command(
    "monitor",
    "Drift of a folder of predictions against the model's training data (monitor.*); logged to MLflow.",
    _arg(
        "folder", help="the --out folder of `tumorseg predict` (its drift.json files, searched recursively)"
    ),
    _arg("--out", help="report JSON to write (default: <folder>/monitor.json)"),
    _arg("--no-mlflow", action=_STORE, help="do not log the report to MLflow"),
    _arg("--fail-on-drift", action=_STORE, help="exit with code 3 when the folder has drifted (cron, CI)"),
)
def _cmd_monitor(args: argparse.Namespace) -> int | None:
    from tumorseg.monitoring.monitor import monitor_folder

    params = _params(args, outside_project=True)
    report = monitor_folder(
        args.folder, params, source=args.params, log_to_mlflow=not args.no_mlflow, out=args.out
    )
    for case_id, outside in sorted(report.flagged_cases.items()):
        print(f"drift: {case_id}: {'; '.join(outside)}")
    print(report.one_line())
    return 3 if report.drifted and args.fail_on_drift else None


@_command(
    "detect",
    "Tumour / no tumour for .mat or image files: CSV case_id, probability, label.",
    _arg("input", help="a .mat/image file or a folder of them"),
    _arg("--out", required=True, help="CSV file to write"),
    _arg("--model", help="2-D model: MLflow URI, folder or checkpoint (default: predict_2d.detect_model)"),
)
def _cmd_detect(args: argparse.Namespace) -> int | None:
    from tumorseg.models.predictor import detect_images

    model = _load_planar(args, "detect_model")
    results = detect_images(args.input, args.out, model)
    positives = sum(r.label for r in results)
    print(f"{len(results)} images, {positives} with tumour ({model.description}) -> {args.out}")


@_command(
    "compress",
    "Prune, quantize (INT8) and export (ONNX) the model; gate on test Dice; register the best as @edge "
    "(--dims 2: the 2-D champion, tumorseg-2d; reports in paths.reports_2d).",
    _arg(
        "--model",
        help="fp32 model: MLflow URI or checkpoint (default: compress.model; --dims 2: compress.model_2d)",
    ),
    _arg(
        "--variants",
        metavar="A,B",
        help="comma-separated variants (default: compress.variants; --dims 2: compress.variants_2d)",
    ),
    _NO_REGISTER,
    _DIMS,
)
def _cmd_compress(args: argparse.Namespace) -> int | None:
    from tumorseg.compression.stage import run_compress_stage

    suffix = "_2d" if args.dims == 2 else ""
    options = {
        f"compress.model{suffix}": args.model,
        f"compress.variants{suffix}": args.variants.split(",") if args.variants else None,
        "compress.register_edge": False if args.no_register else None,
    }
    print(run_compress_stage(_params(args, options), source=args.params, dims=args.dims).one_line())


@_command(
    "tune",
    "Optuna hyper-parameter search (tune.space); trials nested in MLflow; best params -> tune.best_params_file "
    "(--dims 2: the 2-D models, tune.space_2d -> tune.best_params_file_2d).",
    _arg("--n-trials", type=int, help="finished trials wanted in the study (default: tune.n_trials)"),
    _arg("--n-jobs", type=int, help="worker processes on this machine (default: tune.n_jobs)"),
    _arg("--storage", help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: tune.storage)"),
    _arg("--study", help="study name (default: tune.study_name; --dims 2: tune.study_name_2d)"),
    _arg("--timeout", type=float, metavar="S", help="stop starting trials after S seconds"),
    _DIMS,
)
def _cmd_tune(args: argparse.Namespace) -> int | None:
    from tumorseg.tuning.study import run_study

    study_key = "tune.study_name_2d" if args.dims == 2 else "tune.study_name"
    result = run_study(
        _params(args, {study_key: args.study}),
        source=args.params,
        n_trials=args.n_trials,
        n_jobs=args.n_jobs,
        storage=args.storage,
        timeout_s=args.timeout,
        dims=args.dims,
    )
    print(result.one_line())


@_command(
    "flow",
    "Run a Prefect flow: the training pipeline end to end, or the data stages.",
    _arg(
        "name",
        choices=["training", "data", "planar", "dicom"],
        help="which flow (planar: the @2d stages; dicom: the brain-extraction model and the DICOM check)",
    ),
    _arg("--smoke", action=_STORE, help="training: tiny generated data in a temporary workspace (minutes)"),
    _arg("--workspace", help="--smoke: work here instead of a new temporary folder"),
    _arg(
        "--only-if-new-data",
        action=_STORE,
        help="training: stop if the champion was trained on this data",
    ),
    _arg(
        "--tune",
        action=argparse.BooleanOptionalAction,
        help="training: Optuna search first (default: flow.tune)",
    ),
)
def _cmd_flow(args: argparse.Namespace) -> int | None:
    import os

    # A local (ephemeral) Prefect server sends no usage analytics: nothing leaves the machine.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.name == "data":
        from pipelines.data_flows import data_pipeline_flow

        summary = data_pipeline_flow(params_path=args.params, overrides=_overrides(args))
        print("; ".join(f"{k}: {v}" for k, v in summary.items()))
        return 0
    if args.name == "dicom":  # brain extraction model + DICOM check (pipelines/dicom_flow.py)
        from pipelines.dicom_flow import dicom_flow

        summary = dicom_flow(params_path=args.params, overrides=_overrides(args))
        print(f"brain: {summary['brain']['line']}")
        return 0
    if args.name == "planar":  # the 2-D branch (pipelines/planar_flow.py)
        from pipelines.planar_flow import planar_flow

        planar_flow(params_path=args.params, overrides=_overrides(args))
        return 0
    from pipelines.training_flow import run_smoke, training_flow

    if args.smoke:
        summary = run_smoke(args.params, workspace=args.workspace)
        print(f"smoke workspace: {summary['workspace']}")
    else:
        summary = training_flow(
            params_path=args.params,
            overrides=_overrides(args),
            only_if_new_data=args.only_if_new_data,
            tune=args.tune,
        )
    if summary["status"] == "no_new_data":
        print(summary["decision"]["reason"])
    else:
        print("\n".join(summary["promote"]["lines"]))


@_command(
    "schedule",
    "Serve the training flow on the flow.schedule cron (retrains when the raw data changed).",
    _arg("--dry-run", action=_STORE, help="print the deployment and its next runs; do not serve"),
)
def _cmd_schedule(args: argparse.Namespace) -> int | None:
    from pipelines.schedule import serve_training

    serve_training(args.params, overrides=_overrides(args), dry_run=args.dry_run)


@_command(
    "serve",
    "Serve the model over HTTP: POST /predict, a browser viewer at /, OpenAPI docs at /docs.",
    _arg(
        "--model",
        help="MLflow URI, MLflow model folder or checkpoint (default: serve.model, else predict.model)",
    ),
    _arg(
        "--model-2d",
        help="2-D model for .mat/.png/.jpg uploads: MLflow URI, 2-D package or MLflow model folder, or a "
        "2-D best.ckpt (default: serve.model_2d; optional, without it 2-D uploads get 503)",
    ),
    _arg("--host", help="interface to bind (default: serve.host; 0.0.0.0 in a container)"),
    _arg("--port", type=int, help="TCP port (default: serve.port)"),
    _arg(
        "--insecure",
        action=_STORE,
        help="bind a non-loopback interface although no token exists (anyone who reaches it can upload scans)",
    ),
)
def _cmd_serve(args: argparse.Namespace) -> int | None:
    from tumorseg.serving.app import ServeSettings, serve

    options = {f"serve.{key}": getattr(args, key) for key in ("host", "port", "model", "model_2d")}
    serve(ServeSettings.from_params(_params(args, options), source=args.params), insecure=args.insecure)


@_command(
    "token",
    "Bearer tokens for `tumorseg serve`: create one (shown once), revoke one, or list their names.",
    _arg("action", choices=["create", "revoke", "list"], help="what to do"),
    _arg("name", nargs="?", help="who the token is for (create, revoke); audit lines name it"),
)
def _cmd_token(args: argparse.Namespace) -> int | None:
    from tumorseg.errors import ConfigError
    from tumorseg.serving.auth import TokenStore

    store = TokenStore(_params(args).serve.tokens_file)
    if args.action == "list":
        for entry in store.entries():
            print(f"{entry.name}\tcreated {entry.created}")
        return 0
    if not args.name:
        raise ConfigError(f"tumorseg token {args.action} NAME: give the token's name")
    if args.action == "create":
        token = store.create(args.name)
        print(token)
        print(
            f"token {args.name!r} stored (hash only) in {store.path}; send it as 'Authorization: Bearer <token>'",
            file=sys.stderr,
        )
        return 0
    store.revoke(args.name)
    print(f"revoked token {args.name!r}")
    return 0


@_command(
    "preset",
    "Switch the training recipe: list the presets, show one, or apply one to params.yaml in place.",
    _arg("action", choices=["list", "show", "apply"], help="what to do"),
    _arg("name", nargs="?", help="preset (show, apply), e.g. brats-gpu; `list` names them all"),
)
def _cmd_preset(args: argparse.Namespace) -> int | None:
    from tumorseg.errors import ConfigError
    from tumorseg.presets import apply_preset, get_preset, list_lines, load_presets, show_lines

    if args.set:
        raise ConfigError("preset: -S overrides do not apply here; a preset sets its own keys")
    presets = load_presets()
    if args.action == "list":
        print("\n".join(list_lines(presets)))
        return 0
    if args.name is None:
        raise ConfigError(f"preset {args.action}: name a preset; known presets: {', '.join(sorted(presets))}")
    preset = get_preset(args.name, presets)
    if args.action == "show":
        print("\n".join(show_lines(preset, args.params)))
        return 0
    for change in apply_preset(preset, args.params):
        print(change)


def build_parser() -> argparse.ArgumentParser:
    """The ``tumorseg`` parser: ``-v``, then one sub-parser per :data:`COMMANDS` entry, handler in ``args.handler``."""
    parser = argparse.ArgumentParser(prog="tumorseg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        for flags, options in (*COMMON_ARGS, *command.args):
            p.add_argument(*flags, **options)
        p.set_defaults(handler=command.handler)
    return parser


class _DropMessages(logging.Filter):
    """Records of one dependency logger that start with a known-harmless message: dropped."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


HARMLESS_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    # Lightning's tips to install other products are not progress
    "lightning.pytorch.utilities.rank_zero": ("\N{ELECTRIC LIGHT BULB} Tip:",),
    # torch's ONNX exporter offers torchvision's detection ops on every export; tumorseg has none
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
    # a new local MLflow store announces its schema set-up once, in two lines (alembic's own lines are
    # at WARNING); "Updating database tables" comes only after the creation (or from `mlflow db upgrade`)
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
    # matplotlib's first import on a machine says it is indexing fonts (a one-off, a few seconds)
    "matplotlib.font_manager": ("Matplotlib is building the font cache",),
}
"""Dependency log records a tumorseg command knows to be harmless, per logger: not printed."""

HARMLESS_WARNINGS: tuple[str, ...] = (
    # torch's own pytree deprecation, raised inside Lightning on every fit (lightning/pytorch/utilities/_pytree.py)
    r".*isinstance\(treespec, LeafSpec\).*",
    # a new run replaces the previous one's logs and checkpoints on purpose (``--resume`` continues it)
    r"Experiment logs directory .* exists and is not empty",
    r"Checkpoint directory .* exists and is not empty",
    # the distillation teacher of compression's fine-tuning is frozen in eval mode by design
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # MONAI's compute_hausdorff_distance passes its own deprecated argument (2-D HD95)
    r".*always_return_as_numpy.*",
)
"""Dependency warnings a tumorseg command knows to be harmless: not printed (errors are never filtered)."""


def configure_logging(verbose: bool) -> None:
    """One timestamped line per message on stderr; known-harmless dependency noise filtered.

    Lightning puts its own console handler on the ``lightning`` logger and lets records propagate to
    the root handler too: its records stay with its handler alone, so no line comes out twice.
    """
    import warnings

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("lightning").propagate = False
    # highdicom logs every module it copies into a DICOM-SEG at INFO (a dozen lines per file); torch's
    # ONNX exporter runs onnxscript's and onnx_ir's graph passes, which log each pass at INFO
    for chatty in ("highdicom", "onnxscript", "onnx_ir"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name, starts in HARMLESS_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*starts))
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # MLflow draws a progress bar for every artifact download, a model file of a few MiB included: in a
    # console DVC or Prefect captures, each is a line of carriage returns. The user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _one_line_error(command: str, message: str) -> int:
    faults.record_error(command, message)
    print(f"tumorseg {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if os.environ.get(faults.LOG_ENV):  # the crash-consistency tests time their kills from here
        faults.started(args.command)
    try:
        return int(args.handler(args) or 0)
    except TumorsegError as exc:
        return _one_line_error(args.command, str(exc))
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        return _one_line_error(args.command, str(disk_full(exc.filename or "the output folder")))
    except KeyboardInterrupt:
        print(f"tumorseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
