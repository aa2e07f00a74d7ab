"""The MONAI-only pipeline a user would otherwise write: the baseline of ``make bench``'s cold predict.

``LoadImaged -> EnsureChannelFirstd -> Orientationd -> Spacingd -> NormalizeIntensityd ->
sliding_window_inference -> Invertd -> SaveImaged`` over BraTS 2021 case folders, with the network
``python -m benchmarks.cold_predict`` exports (the champion, pickled as a MONAI module) and the
champion's window settings. Region outputs (sigmoid WT/TC/ET) become BraTS labels (1 NCR, 2 ED,
4 ET) with the nesting BraTS uses. It imports no tumorseg code: it is what a MONAI user writes.

Usage::

    python benchmarks/monai_pipeline.py CASES_DIR OUT_DIR NETWORK.pt --spacing 2 2 2 --roi 64 64 64 \
        --overlap 0.5 --sw-batch-size 4 --mode gaussian --threshold 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

MODALITIES = ("t1", "t1ce", "t2", "flair")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("network", type=Path)
    parser.add_argument("--spacing", type=float, nargs=3, required=True)
    parser.add_argument("--roi", type=int, nargs=3, required=True)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--sw-batch-size", type=int, default=4)
    parser.add_argument("--mode", default="gaussian")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args(argv)

    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        Spacingd,
    )

    pre = Compose(
        [
            LoadImaged(keys="image"),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=args.spacing, mode="bilinear"),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        ]
    )
    post = Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True),
            SaveImaged(
                keys="pred",
                output_dir=str(args.out),
                output_postfix="seg",
                separate_folder=False,
                output_dtype="uint8",
                resample=False,
                print_log=False,
            ),
        ]
    )
    network = torch.load(args.network, map_location="cpu", weights_only=False).eval()
    cases = sorted(p for p in args.cases.iterdir() if p.is_dir())
    for case in cases:
        item = pre({"image": [str(case / f"{case.name}_{m}.nii.gz") for m in MODALITIES]})
        with torch.inference_mode():
            logits = sliding_window_inference(
                item["image"][None],
                args.roi,
                args.sw_batch_size,
                network,
                overlap=args.overlap,
                mode=args.mode,
            )
        regions = torch.sigmoid(logits[0]) > args.threshold  # WT, TC, ET
        labels = torch.zeros_like(regions[0], dtype=torch.uint8)
        labels[regions[0]] = 2
        labels[regions[0] & regions[1]] = 1
        labels[regions[0] & regions[1] & regions[2]] = 4
        # the prediction carries the image's metadata and transform record, which Invertd undoes
        item["pred"] = item["image"][:1] * 0 + labels[None].to(item["image"].dtype)
        post(item)
    print(f"monai pipeline: {len(cases)} cases in {time.perf_counter() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
