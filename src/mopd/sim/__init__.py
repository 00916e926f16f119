"""Simulated deployments for tests and benchmarks.

``clock`` runs asyncio on virtual time; ``backends`` has a batching-server
model of the student and teachers, a trainer with a set step time, and
instant backends that measure the pipeline's own overhead.
"""

from mopd.sim.backends import (
    BatchingServer,
    InstantSampler,
    InstantScorer,
    InstantTrainer,
    ServerModel,
    SimRenderer,
    SimScorer,
    SimStudent,
    SimTrainer,
    write_rows,
)
from mopd.sim.clock import VirtualTimeLoop, run_virtual

__all__ = [
    "BatchingServer",
    "InstantSampler",
    "InstantScorer",
    "InstantTrainer",
    "ServerModel",
    "SimRenderer",
    "SimScorer",
    "SimStudent",
    "SimTrainer",
    "VirtualTimeLoop",
    "run_virtual",
    "write_rows",
]
