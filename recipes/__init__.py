"""Every recipe: each module in this package that defines `RECIPE`, so a new recipe is one
file here and nothing else."""

import importlib
import pkgutil


def discover() -> list:
    modules = (importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__))
    return [module.RECIPE for module in modules if hasattr(module, "RECIPE")]


RECIPES = discover()
