"""Reference models: complete, runnable PyTorch implementations of the models the kernels
serve, each built from named configs with random weights (`build`) or from a local checkpoint.
Each model is a module here: `fastgen.models.sana` (SANA Linear DiT)."""
from fastgen.models import sana

__all__ = ["sana"]
