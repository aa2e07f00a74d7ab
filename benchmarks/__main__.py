"""``python -m benchmarks`` (``make bench``): every benchmark, or ``--only NAME``."""

from __future__ import annotations

import sys

from benchmarks.suite import main

sys.exit(main())
