"""Name -> method class. `discover()` imports every module of this package once; `build` makes
the method a config section names."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import UserError
from .base import Method, MethodConfig

__all__ = ["register", "get", "build", "names", "all_methods", "discover", "NOT_METHODS"]

_METHODS: dict = {}
#: Modules of this package that are infrastructure, not methods.
NOT_METHODS = {"base", "registry", "peft_common"}


def register(method_class):
    """Class decorator: make a method available under its `name`."""
    if method_class.name in _METHODS and _METHODS[method_class.name] is not method_class:
        raise RuntimeError(f"two methods are registered as {method_class.name!r}")
    _METHODS[method_class.name] = method_class
    return method_class


def get(name: str):
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(names())}") from None


def build(cfg: MethodConfig) -> Method:
    """The method `cfg` configures (`cfg.name` picks the class), ready to `apply`."""
    return get(cfg.name)(cfg)


def names() -> list[str]:
    return sorted(_METHODS)


def all_methods() -> list:
    return [_METHODS[n] for n in names()]


def discover() -> None:
    package = __name__.rpartition(".")[0]
    path = importlib.import_module(package).__path__
    for info in pkgutil.iter_modules(path):
        if info.name not in NOT_METHODS:
            importlib.import_module(f"{package}.{info.name}")
