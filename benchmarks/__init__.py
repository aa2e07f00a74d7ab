"""tumorseg's benchmarks: each figure a ratio against a baseline measured in the same run.

Kept apart from the installed package (as nnU-Net keeps its benchmarking and MONAI its
profiling): run from the project root with ``make bench`` or ``python -m benchmarks``.
"""
