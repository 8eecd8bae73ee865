"""asyncgen: asynchronous multi-device denoising for diffusers pipelines — the engine.

The engine splits a denoiser into stages (:mod:`asyncgen.split`), chooses the cuts
(:mod:`asyncgen.cost`), describes who computes what and when (:mod:`asyncgen.schedules`),
executes it serially (the simulators) or across ranks (:mod:`asyncgen.runtime`,
:mod:`asyncgen.comm`), and places the other components (:mod:`asyncgen.placement`).
The drop-in pipeline wrappers are the layer above: ``from asyncgen.pipelines import
AsyncDiffPipeline, ASGPipeline``. Names are imported on first use, so ``import asyncgen``
stays cheap (the CLI starts without loading torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the engine module that defines it
_EXPORTS = {
    "split_denoiser": "asyncgen.split.registry",
    "supported_denoisers": "asyncgen.split.registry",
    "DenoiserSplit": "asyncgen.split.units",
    "Stage": "asyncgen.split.units",
    "make_stages": "asyncgen.split.units",
    "BoundaryState": "asyncgen.split.boundary",
    "choose_cuts": "asyncgen.cost.cuts",
    "balanced_cuts": "asyncgen.cost.cuts",
    "Topology": "asyncgen.schedules.asyncdiff",
    "AsyncSchedule": "asyncgen.schedules.asyncdiff",
    "SerialSimulator": "asyncgen.schedules.simulator",
    "CfgSerialSimulator": "asyncgen.schedules.simulator",
    "DistContext": "asyncgen.comm.context",
    "resolve_context": "asyncgen.comm.group",
    "RemoteRankError": "asyncgen.comm.failure",
    "DistributedRuntime": "asyncgen.runtime.asyncdiff",
    "AsyncDiffHook": "asyncgen.runtime.asyncdiff_hook",
    "MemoryPlan": "asyncgen.placement.planner",
    "Placement": "asyncgen.placement.planner",
    "plan_memory": "asyncgen.placement.planner",
}
# the wrappers live one layer up; the engine does not import them
_WRAPPERS = ("AsyncDiffPipeline", "ASGPipeline")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _WRAPPERS:
        raise AttributeError(f"asyncgen.{name} is a pipeline wrapper, which lives in asyncgen.pipelines: "
                             f"from asyncgen.pipelines import {name}")
    raise AttributeError(f"module 'asyncgen' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
