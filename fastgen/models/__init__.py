"""Reference models: complete, runnable PyTorch implementations of the models the kernels
serve, each built from named configs with random weights (`build`) or from a local checkpoint.
Each model is a module here: `fastgen.models.sana` (SANA Linear DiT), `fastgen.models.dcae` (DC-AE
autoencoder)."""
from fastgen.models import dcae, sana

__all__ = ["dcae", "sana"]
