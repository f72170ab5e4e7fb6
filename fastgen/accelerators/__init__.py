"""The accelerators of `fastgen.accelerate`, one module per kind of submodule they replace, each
registering its functions through `patch.accelerator`. accelerate imports every module of this
package (`load_all`): adding an accelerator is adding a module here."""
import importlib
import pkgutil


def load_all() -> None:
    """Import every accelerator module of this package, which registers its accelerators."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
