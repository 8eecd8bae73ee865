"""The asynchronous-learning catalogue: published methods that make learning systems
asynchronous, each on the library its users already use, each with a miniature
experiment that reproduces its paper's headline comparison (see ``asyncgen catalogue``).

One subpackage per family. A family's ``__init__`` only describes its experiments
(``EXPERIMENTS``, a list of :class:`~asyncgen.catalogue.frame.ExperimentInfo`) and
imports nothing optional, so listing works without any extra installed; the method
modules import the family's libraries and say which extra to install when one is missing.
"""

from __future__ import annotations

import importlib

from .frame import CatalogueError, ExperimentInfo

FAMILIES = ("federated", "optim", "gnn", "rlhf", "continual", "hpo", "netsim", "quantum")


def experiments() -> dict[str, ExperimentInfo]:
    """Every experiment of every family present, by name, in family order."""
    found: dict[str, ExperimentInfo] = {}
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{family}":
                continue  # family not written yet
            raise
        for info in getattr(module, "EXPERIMENTS", ()):
            if info.name in found:
                raise RuntimeError(f"two catalogue experiments are named {info.name!r}")
            found[info.name] = info
    return found


def get_experiment(name: str) -> ExperimentInfo:
    known = experiments()
    if name not in known:
        raise CatalogueError(f"unknown experiment {name!r}; known: {', '.join(known) or '(none)'}")
    return known[name]


__all__ = ["CatalogueError", "ExperimentInfo", "FAMILIES", "experiments", "get_experiment"]
