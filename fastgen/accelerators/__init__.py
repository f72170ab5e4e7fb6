"""The accelerators of `fastgen.accelerate`, one module per kind of submodule they replace;
importing this package registers them all."""
from fastgen.accelerators import diffusers_attention, diffusers_dcae, diffusers_norm, diffusers_vq

__all__ = ["diffusers_attention", "diffusers_dcae", "diffusers_norm", "diffusers_vq"]
