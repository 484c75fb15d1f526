"""A package that is also its verb: ``lmlab.critique(...)`` and ``lmlab.evaluate(...)`` call the function of
that name, while ``lmlab.critique.core`` and ``lmlab.evaluate.runner`` stay submodules.

Python binds ``lmlab.critique`` to the subpackage as soon as anything imports it, so a function exported
under the same name from ``lmlab/__init__.py`` would be replaced by the package; making the package
callable keeps one meaning whatever was imported first."""

from __future__ import annotations

import importlib
import inspect
import sys
import types


def make_callable(package: str, module: str, function: str) -> None:
    """Calling the package ``package`` calls ``module.function`` (imported on the first call)."""

    def target():
        return getattr(importlib.import_module(module), function)

    class Verb(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return target()(*args, **kwargs)

        @property
        def __signature__(self) -> inspect.Signature:
            return inspect.signature(target())

        @property
        def __wrapped__(self):  # the function, for inspect.unwrap (its docstring documents the verb's parameters)
            return target()

    sys.modules[package].__class__ = Verb
