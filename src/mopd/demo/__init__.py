"""Embedded demo: a tokenizer, two specialist teachers, a weak student and data.

``ensure_demo`` builds the assets once on the CPU, with fixed seeds, and
caches them on disk. ``build_untrained`` writes the same layout with
random-init models in seconds, for tests that need real models but not
trained ones.
"""

from __future__ import annotations

from mopd.demo.build import (
    BUILD_VERSION,
    DemoAssets,
    build_untrained,
    default_cache_dir,
    ensure_demo,
    load_demo,
)
from mopd.demo.evaluate import greedy_accuracy
from mopd.demo.tasks import ARITHMETIC_ROUTE, MATH_ROUTE, ROUTES, extract_final_answer, is_correct

__all__ = [
    "ARITHMETIC_ROUTE",
    "BUILD_VERSION",
    "MATH_ROUTE",
    "ROUTES",
    "DemoAssets",
    "build_untrained",
    "default_cache_dir",
    "ensure_demo",
    "extract_final_answer",
    "greedy_accuracy",
    "is_correct",
    "load_demo",
]
