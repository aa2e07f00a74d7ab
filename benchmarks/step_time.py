"""Training step time of candidate U-Nets, float32 / channels-last / bfloat16 (decision record 0015).

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.step_time   # as an AVX2-only CPU
    python -m benchmarks.step_time --bf16                                           # native bfloat16 CPUs

Forward + backward + AdamW on a random (2, 4, 64, 64, 64) batch with a BCE loss over three region
channels; the median of ``--steps`` after two warm-up steps, wall time with ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

WIDTHS = {
    "32-64-128-256, 2 units": ((32, 64, 128, 256), 2),
    "16-32-64-128, 2 units": ((16, 32, 64, 128), 2),
    "16-32-64-128, 1 unit": ((16, 32, 64, 128), 1),
    "24-48-96-192, 1 unit": ((24, 48, 96, 192), 1),
}


def step_seconds(
    channels: tuple[int, ...], units: int, *, channels_last: bool, bf16: bool, steps: int
) -> float:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 4, 3, channels, (2, 2, 2), num_res_units=units, norm="instance")
    x, y = torch.randn(2, 4, 64, 64, 64), torch.rand(2, 3, 64, 64, 64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        with autocast():
            out = net(x)
        torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for name, (channels, units) in WIDTHS.items():
        plain, last = (
            step_seconds(channels, units, channels_last=cl, bf16=args.bf16, steps=args.steps)
            for cl in (False, True)
        )
        print(f"{name}: {plain:.3f} s/step, channels-last {last:.3f} s/step")


if __name__ == "__main__":
    main()
