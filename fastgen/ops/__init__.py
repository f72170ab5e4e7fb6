"""fastgen ops: each module besides `registry` is one op family (math, reference, custom op,
autograd, dispatch) and registers its ops with `registry.register`.

Importing this package imports every family module found here, which registers each op as
`torch.ops.fastgen.<name>`; adding a family is adding its module. FUNCTIONS maps each op name
to the family module's Python function of that name, which `fastgen` exports.
"""
import importlib
import pkgutil

from fastgen.ops.registry import OPS

FAMILIES = tuple(importlib.import_module(f"{__name__}.{module.name}")
                 for module in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name)
                 if module.name != "registry")


def _functions() -> dict:
    functions = {}
    for family in FAMILIES:
        for name in OPS:
            if callable(getattr(family, name, None)):
                functions.setdefault(name, getattr(family, name))
    missing = set(OPS) - set(functions)
    if missing:
        raise ImportError(f"fastgen.ops: no family module defines a function for the op(s) {sorted(missing)}: "
                          f"each op's family module defines the function of the op's name")
    return functions


FUNCTIONS = _functions()

__all__ = ["FAMILIES", "FUNCTIONS", "OPS"]
