"""A small HTTP model server for laptops and tests: the vLLM-compatible subset
that the ``openai`` backend uses, over a local transformers model directory.

It is not a vLLM replacement: one process, one set of weights, batching by the
local backend's :class:`~mopd.backends.local.executor.DeviceExecutor`.
"""
