"""diffusers' timestep-modulated group norms, fused into `fastgen::ada_group_norm`.

- `ResnetBlock2D(time_embedding_norm="scale_shift")` (the ResBlock of ADM-style UNets, e.g. a
  UNet2DModel built with resnet_time_scale_shift="scale_shift") computes, after conv1,

      (scale, shift) = time_emb_proj(silu(temb))       (silu skipped when skip_time_act)
      h = silu(norm2(h) * (1 + scale) + shift)         norm2: an affine GroupNorm

  which is exactly ada_group_norm(h, scale, shift, G, norm2.weight, norm2.bias, eps, "silu"):
  the op applies the norm's own weight and bias before the modulation, as diffusers does.
- `AdaGroupNorm` (the "ada_group" norms of ResnetBlockCondNorm2D) computes
  GroupNorm(x) * (1 + scale) + shift with a GroupNorm without affine and (scale, shift) =
  linear(act(emb)): ada_group_norm(x, scale, shift, G, None, None, eps, None).

Each module keeps its class, submodules and parameters; accelerate sets an instance-level
`forward` that computes the same function with the op (the original forward stays on the
class), and restore removes it again. Blocks in any other configuration, and modules whose
forward something else already wrapped, are left alone with the reason.
"""
from __future__ import annotations

import types
from typing import Callable, Union

import torch
from torch import nn

from fastgen.accelerators.patch import BackendScope, Swap, accelerator, is_diffusers, op_not_selected, replace_forward

_OP = "ada_group_norm"


def _fused_scale_shift_resnet_forward(scope: BackendScope, original_forward: Callable):
    """ResnetBlock2D.forward with norm2, the scale/shift modulation and the SiLU in one op."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # diffusers' deprecation path for its ignored `scale` argument
            return original_forward(input_tensor, temb, *args, **kwargs)
        from fastgen.ops.ada_norm import ada_group_norm

        hidden = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            if hidden.shape[0] >= 64:  # diffusers' workaround for nearest upsampling of large NHWC batches
                input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
            input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
        elif self.downsample is not None:
            input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
        hidden = self.conv1(hidden)
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        scale, shift = self.time_emb_proj(temb).to(hidden.dtype).chunk(2, dim=1)
        norm = self.norm2
        hidden = scope.run(ada_group_norm, hidden, scale, shift, norm.num_groups, norm.weight.to(hidden.dtype),
                           norm.bias.to(hidden.dtype), norm.eps, "silu")
        hidden = self.conv2(self.dropout(hidden))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor

    return forward


def _fused_ada_group_norm_forward(scope: BackendScope):
    """AdaGroupNorm.forward as one op after the embedding's projection."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        from fastgen.ops.ada_norm import ada_group_norm

        if self.act:
            emb = self.act(emb)
        scale, shift = self.linear(emb).to(x.dtype).chunk(2, dim=1)
        return scope.run(ada_group_norm, x, scale, shift, self.num_groups, None, None, self.eps, None)

    return forward


@accelerator
def diffusers_scale_shift_resnet(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "ResnetBlock2D"):
        return None
    if module.time_embedding_norm != "scale_shift":
        return (f"time_embedding_norm={module.time_embedding_norm!r}: only 'scale_shift' fuses "
                f"(the norm is modulated only there)")
    if module.time_emb_proj is None:
        return "no time embedding (temb_channels=None): norm2 is not modulated"
    if type(module.nonlinearity) is not nn.SiLU:
        return f"nonlinearity {type(module.nonlinearity).__name__}: the fused op applies SiLU only"
    if not module.norm2.affine:
        return "norm2 without affine parameters (diffusers builds it affine)"
    forward = _fused_scale_shift_resnet_forward(BackendScope(backend), module.forward)
    return op_not_selected(_OP, ops) or replace_forward(module, types.MethodType(forward, module), "ResnetBlock2D.norm2+scale_shift+silu",
                           "fastgen fused forward", _OP)


@accelerator
def diffusers_ada_group_norm(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "AdaGroupNorm"):
        return None
    forward = _fused_ada_group_norm_forward(BackendScope(backend))
    return op_not_selected(_OP, ops) or replace_forward(module, types.MethodType(forward, module), "AdaGroupNorm", "fastgen fused forward", _OP)
