"""The one registry of methods. Adding a method is one file in this folder plus one line here.

Config validation (:func:`check_method`), the command line's choices and the benchmarks
read :data:`REGISTRY`; the trainer builds its method with :func:`build_method` and never
asks which one it runs.
"""

from __future__ import annotations

import torch

from dtg.config import Config, ConfigError
from dtg.methods.base import Batch, Method, labeled_losses
from dtg.methods.dtg.method import DTGMethod
from dtg.methods.oracle import OracleMethod
from dtg.methods.sparse import SparseMethod
from dtg.methods.supervised import SupervisedMethod

REGISTRY: dict[str, type] = {m.name: m for m in (SupervisedMethod, SparseMethod, DTGMethod, OracleMethod)}
# The methods a user compares (the demo's default); oracle is a ceiling that reads the unlabeled images' boxes.
MAIN_METHODS = ("supervised", "sparse", "dtg")

__all__ = ["Batch", "MAIN_METHODS", "Method", "REGISTRY", "build_method", "check_method", "labeled_losses", "method_names"]


def method_names() -> list[str]:
    """The registered method names, in registry order."""
    return list(REGISTRY)


def check_method(name: str) -> None:
    """A one-line :class:`ConfigError` for a name that is not registered."""
    if name not in REGISTRY:
        raise ConfigError(f"config key 'method': {name!r} is not one of {method_names()}")


def build_method(cfg: Config, device: torch.device) -> Method:
    """The method named by ``cfg.method``."""
    check_method(cfg.method)
    return REGISTRY[cfg.method](cfg, device)
