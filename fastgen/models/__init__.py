"""Reference models: complete, runnable PyTorch implementations of the models the kernels
serve, each built from named configs with random weights (`build`) or from a local checkpoint.
Each model is a module here: `fastgen.models.sana` (SANA Linear DiT), `fastgen.models.ldm_unet` (LDM /
SD 1.5 UNet), `fastgen.models.dcae` (DC-AE
autoencoder), `fastgen.models.var_vqvae` (VAR multi-scale VQVAE), `fastgen.models.vqgan` (VQGAN /
l2-normalized single-scale quantizer)."""
from fastgen.models import adm_unet, dcae, ldm_unet, sana, var_vqvae, vqgan

__all__ = ["adm_unet", "dcae", "ldm_unet", "sana", "var_vqvae", "vqgan"]
