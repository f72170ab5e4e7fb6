"""Reference models: complete, runnable PyTorch implementations of the models the kernels
serve, each built from named configs with random weights (`build`) or from a local checkpoint
(`from_safetensors`), with `example_step` making one representative step at the image side
`example_resolution` gives:

- `sana`: SANA Linear DiT (diffusers layout), flow-matching sampling with guidance
- `flux`: the FLUX.1 [dev] / [schnell] MM-DiT (diffusers layout), rectified-flow sampling with
  the resolution-dependent shift and distilled guidance
- `sd3`: the Stable Diffusion 3 / 3.5 MM-DiT (diffusers layout), rectified-flow sampling with
  classifier-free guidance
- `ldm_unet`: the LDM / Stable Diffusion 1.5 UNet (diffusers layout), DDIM with guidance
- `adm_unet`: the ADM UNet of guided diffusion, DDPM (learned variance) and DDIM, with
  classifier guidance
- `adm_classifier`: ADM's noisy-image classifier (guided-diffusion layout), which guides it
- `dcae`: the DC-AE deep-compression autoencoder (diffusers layout)
- `autoencoder_kl`: the KL autoencoder (VAE) of SD, SDXL and FLUX.1 (diffusers layout), tiled
  encode and decode
- `stylegan`: the StyleGAN (v1) generator
- `stylegan2`: the StyleGAN2 generator and discriminator, the R1-regularised training step
  (with style mixing)
- `stylegan3`: the StyleGAN3 alias-free generator, T and R
- `var`: the VAR next-scale prediction transformer, class-conditional generation with guidance
- `var_vqvae`: VAR's multi-scale VQVAE
- `vqgan`: the VQGAN / l2-normalised single-scale quantizer

`fastgen.models.common` holds what they share, `fastgen.models.mmdit` what flux and sd3 share."""
from fastgen.models import (adm_classifier, adm_unet, autoencoder_kl, dcae, flux, ldm_unet, sana, sd3, stylegan,
                            stylegan2, stylegan3, var, var_vqvae, vqgan)

__all__ = ["adm_classifier", "adm_unet", "autoencoder_kl", "dcae", "flux", "ldm_unet", "sana", "sd3", "stylegan",
           "stylegan2", "stylegan3", "var", "var_vqvae", "vqgan"]
