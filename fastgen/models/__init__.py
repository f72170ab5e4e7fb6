"""Reference models: complete, runnable PyTorch implementations of the models the kernels
serve, each built from named configs with random weights (`build`) or from a local checkpoint.
Each model is a module here: `fastgen.models.sana` (SANA Linear DiT), `fastgen.models.dcae` (DC-AE
autoencoder), `fastgen.models.var_vqvae` (VAR multi-scale VQVAE), `fastgen.models.vqgan` (VQGAN /
l2-normalized single-scale quantizer)."""
from fastgen.models import dcae, sana, var_vqvae, vqgan

__all__ = ["dcae", "sana", "var_vqvae", "vqgan"]
