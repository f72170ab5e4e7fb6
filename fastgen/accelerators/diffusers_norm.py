"""diffusers' norms and what follows them, fused into `fastgen::ada_group_norm` (group norms
and the SiLU after them) and `fastgen::ada_layer_norm` (SANA's modulated layer norms).

`ada_group_norm(x, scale, shift, G, weight, bias, eps, act)` is act(GroupNorm(x) * (1 + scale) + shift)
with the norm's own affine applied first; with scale = shift = 0 it is act(norm(x)) for an
`nn.GroupNorm` norm (weight or bias None where the norm has none).

- `ResnetBlock2D` (every time_embedding_norm; SiLU nonlinearity) computes

      h = silu(norm1(x))                                  -> ada_group_norm(x, 0, 0, ..., "silu")
      x, h = upsample or downsample of x and h (when the block has one)
      h = conv1(h)
      t = time_emb_proj(silu(temb))                       (silu skipped when skip_time_act; t = temb
                                                           when there is no time_emb_proj)
      "default":     h = silu(norm2(h + t))               (t added only when temb is not None)
      "scale_shift": h = silu(norm2(h) * (1 + scale) + shift), (scale, shift) = t split in two
      any other:     h = silu(norm2(h))                   (diffusers allows it without temb_channels)
      out = (conv_shortcut(x) + conv2(dropout(h))) / output_scale_factor

  and each silu(norm(...)) line is one ada_group_norm (scale and shift are zero except for
  "scale_shift"). Dropout follows the activation, so it sees the same tensor as in diffusers:
  exact in training mode too. A call with diffusers' deprecated extra `scale` argument runs
  diffusers' forward (which warns and ignores it). The fused forward calls neither the norms
  nor the nonlinearity on h: a block where hooks or an instance-level forward (sequential
  offloading, which brings the norms' weights to the device there) sit on one is left alone.
- `AdaGroupNorm` (the "ada_group" norms of ResnetBlockCondNorm2D) computes
  GroupNorm(x) * (1 + scale) + shift with a GroupNorm without affine and (scale, shift) =
  linear(act(emb)): ada_group_norm(x, scale, shift, G, None, None, eps, None).
- The output head of diffusers' VAE `Encoder` / `Decoder`, `UNet2DModel` and
  `UNet2DConditionModel`, `conv_act(conv_norm_out(h))` with a GroupNorm and a SiLU: the norm's
  forward becomes silu(norm(h)) and the owner's `conv_act` an `nn.Identity`. The pair is fused
  only where it is proven: these classes' own forwards (checked to be the ones diffusers
  defines, not wrapped on the instance) apply conv_act to conv_norm_out's output and use neither
  anywhere else. The activation is replaced in the owner rather than given a forward because
  older diffusers shared one activation instance between modules. Forward hooks on the norm
  would see the activated output, and hooks on the activation would not run: their presence
  leaves the pair alone.
  MoVQ's Decoder (norm_type="spatial") has a SpatialNorm there, which is left alone.

- `SanaTransformerBlock` computes, with (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
  gate_mlp) = scale_shift_table + timestep split in six,

      x = x + gate_msa * attn1(norm1(x) * (1 + scale_msa) + shift_msa)   -> ada_layer_norm(x, scale_msa, shift_msa)
      x = x + attn2(x, caption)                                         (when the block has one)
      x = x + gate_mlp * ff(norm2(x) * (1 + scale_mlp) + shift_mlp)     -> ada_layer_norm(x, scale_mlp, shift_mlp)

  with norm1 and norm2 LayerNorms without affine (a norm2 with elementwise_affine=True is left
  alone: the op has no affine). The transformer's `SanaModulatedNorm` head, norm(x) * (1 +
  scale) + shift with (shift, scale) = scale_shift_table + temb, is one ada_layer_norm as well.
  diffusers rounds the norm's output to the activations' dtype before the modulation, the op
  once after it. A call whose timestep (temb) dtype differs from the activations' runs diffusers'
  forward: there the modulation promotes the result to the wider dtype, which the op does not.

Each module keeps its class, submodules (but for the heads' conv_act, above) and parameters; accelerate sets an instance-level
`forward` that computes the same function with the op (the original forward stays on the
class), and restore removes it again. Blocks in any other configuration, and modules whose
forward something else already wrapped, are left alone with the reason.
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional, Union

import torch
from torch import nn

from fastgen.accelerators.patch import (BackendScope, Swap, accelerator, is_diffusers, op_not_selected,
                                        replace_attribute, replace_forward)
from fastgen.models.common import fused_group_norm

_OP = "ada_group_norm"
_LAYER_NORM_OP = "ada_layer_norm"


def _group_norm_silu(scope: BackendScope, norm: nn.GroupNorm, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                     shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(norm(x) * (1 + scale) + shift) in one op, under the accelerator's backend."""
    return scope.run(fused_group_norm, norm, x, "silu", scale, shift)


def _fused_resnet_forward(scope: BackendScope, original_forward: Callable):
    """ResnetBlock2D.forward with norm1 -> SiLU and norm2 (-> scale/shift) -> SiLU as one op each."""

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        if args or kwargs:  # diffusers' deprecation path for its ignored `scale` argument
            return original_forward(input_tensor, temb, *args, **kwargs)

        hidden = _group_norm_silu(scope, self.norm1, input_tensor)
        if self.upsample is not None:
            if hidden.shape[0] >= 64:  # diffusers' workaround for nearest upsampling of large NHWC batches
                input_tensor, hidden = input_tensor.contiguous(), hidden.contiguous()
            input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
        elif self.downsample is not None:
            input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
        hidden = self.conv1(hidden)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            scale, shift = temb.flatten(1).to(hidden.dtype).chunk(2, dim=1)
            hidden = _group_norm_silu(scope, self.norm2, hidden, scale, shift)
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                hidden = hidden + temb
            hidden = _group_norm_silu(scope, self.norm2, hidden)
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


def _not_silu(name: str, activation: nn.Module) -> Optional[str]:
    if type(activation) is nn.SiLU:
        return None
    return f"{name} is {type(activation).__name__}: the fused op applies SiLU only"


def _not_group_norm(name: str, norm: nn.Module) -> Optional[str]:
    if type(norm) is nn.GroupNorm:
        return None
    return f"{name} is {type(norm).__name__}, not a GroupNorm"


def _not_diffusers_forward(module: nn.Module) -> Optional[str]:
    """The reason to leave `module` when its class runs another forward than the one diffusers
    defines (patched onto the class by another library): the replacements reproduce diffusers' own."""
    forward = type(module).forward
    if (getattr(forward, "__module__", None) == type(module).__module__
            and getattr(forward, "__qualname__", None) == f"{type(module).__name__}.forward"):
        return None
    return (f"{type(module).__name__}.forward is not diffusers' own (patched onto the class): "
            f"the replacement would bypass the patch")


def _skipped_hooks(name: str, module: nn.Module) -> Optional[str]:
    """The reason to leave a block when its submodule `name`, which the fused forward no longer
    calls, has hooks or a forward installed on its instance (offloading hooks, which bring its
    weights to the device there): they would not run."""
    if "forward" in vars(module):
        return f"{name}.forward is wrapped on the instance (e.g. by offloading hooks), and the fused forward does not call {name}"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has hooks, and the fused forward does not call {name}"
    return None


@accelerator
def diffusers_resnet(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "ResnetBlock2D"):
        return None
    scale_shift = module.time_embedding_norm == "scale_shift"
    if scale_shift and module.time_emb_proj is None:
        return "time_embedding_norm='scale_shift' without a time embedding (temb_channels=None)"
    reason = (_not_silu("nonlinearity", module.nonlinearity) or _not_group_norm("norm1", module.norm1)
              or _not_group_norm("norm2", module.norm2) or _not_diffusers_forward(module)
              or _skipped_hooks("norm1", module.norm1) or _skipped_hooks("norm2", module.norm2)
              or _skipped_hooks("nonlinearity", module.nonlinearity) or op_not_selected(_OP, ops))
    if reason:
        return reason
    forward = _fused_resnet_forward(BackendScope(backend), module.forward)
    norm2 = "norm2+scale_shift+silu" if scale_shift else "norm2+silu"
    return replace_forward(module, types.MethodType(forward, module), f"ResnetBlock2D.norm1+silu, {norm2}",
                           "fastgen fused forward", _OP)


# The diffusers classes whose forward applies conv_act to conv_norm_out's output and uses neither
# anywhere else, each with the module defining it (other diffusers classes share the names).
_OUTPUT_NORM_OWNERS = {
    "Encoder": "diffusers.models.autoencoders.vae",
    "Decoder": "diffusers.models.autoencoders.vae",
    "UNet2DModel": "diffusers.models.unets.unet_2d",
    "UNet2DConditionModel": "diffusers.models.unets.unet_2d_condition",
}


@accelerator
def diffusers_output_norm_act(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    name = type(module).__name__
    if name not in _OUTPUT_NORM_OWNERS or not is_diffusers(module, name, _OUTPUT_NORM_OWNERS[name]):
        return None
    norm, act = module.conv_norm_out, module.conv_act
    if norm is None:
        return "no conv_norm_out (norm_num_groups=None)"
    reason = (_not_group_norm("conv_norm_out", norm) or _not_silu("conv_act", act) or _not_diffusers_forward(module)
              or op_not_selected(_OP, ops))
    if reason:
        return reason
    if "forward" in vars(module):
        return (f"{name}.forward is wrapped on the instance (e.g. by offloading hooks): that conv_act follows "
                f"conv_norm_out there cannot be checked")
    if norm._forward_hooks:
        return "forward hooks on conv_norm_out would see its output after the SiLU"
    reason = _skipped_hooks("conv_act", act)
    if reason:
        return reason
    norm_swap = replace_forward(norm, functools.partial(_group_norm_silu, BackendScope(backend), norm),
                                "GroupNorm", "GroupNorm+SiLU", _OP)
    if isinstance(norm_swap, str):
        return norm_swap
    act_swap = replace_attribute(module, "conv_act", nn.Identity().train(act.training), "Identity", _OP)

    def undo() -> None:
        act_swap.undo()
        norm_swap.undo()

    return Swap(f"{name}.conv_norm_out+conv_act", "fused GroupNorm+SiLU in conv_norm_out, conv_act Identity", _OP, undo)


@accelerator
def diffusers_ada_group_norm(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "AdaGroupNorm"):
        return None
    forward = _fused_ada_group_norm_forward(BackendScope(backend))
    return op_not_selected(_OP, ops) or replace_forward(module, types.MethodType(forward, module), "AdaGroupNorm", "fastgen fused forward", _OP)


def _fused_sana_block_forward(scope: BackendScope, original_forward: Callable):
    """SanaTransformerBlock.forward with each norm and its modulation as one ada_layer_norm."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None, timestep: Optional[torch.Tensor] = None,
                height: Optional[int] = None, width: Optional[int] = None) -> torch.Tensor:
        from fastgen.ops.ada_norm import ada_layer_norm

        if timestep.dtype != hidden_states.dtype:
            return original_forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                    timestep, height, width)
        # (B, 6, C) -> six (B, C): the op's per-sample modulation.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).unbind(1)
        normed = scope.run(ada_layer_norm, hidden_states, scale_msa, shift_msa, self.norm1.eps)
        hidden_states = hidden_states + gate_msa[:, None] * self.attn1(normed)
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                                       attention_mask=encoder_attention_mask)
        normed = scope.run(ada_layer_norm, hidden_states, scale_mlp, shift_mlp, self.norm2.eps)
        fed = self.ff(normed.unflatten(1, (height, width)).permute(0, 3, 1, 2))
        return hidden_states + gate_mlp[:, None] * fed.flatten(2, 3).permute(0, 2, 1)

    return forward


def _fused_sana_output_norm_forward(scope: BackendScope, original_forward: Callable):
    """SanaModulatedNorm.forward as one ada_layer_norm."""

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, scale_shift_table: torch.Tensor) -> torch.Tensor:
        from fastgen.ops.ada_norm import ada_layer_norm

        if not temb.dtype == scale_shift_table.dtype == hidden_states.dtype:
            return original_forward(hidden_states, temb, scale_shift_table)
        shift, scale = (scale_shift_table[None] + temb[:, None].to(scale_shift_table.device)).unbind(1)
        return scope.run(ada_layer_norm, hidden_states, scale, shift, self.norm.eps)

    return forward


def _not_plain_layer_norm(name: str, norm: nn.Module) -> Optional[str]:
    if type(norm) is not nn.LayerNorm:
        return f"{name} is {type(norm).__name__}, not a LayerNorm"
    if norm.weight is not None or norm.bias is not None:
        return f"{name} has an elementwise affine, which ada_layer_norm does not apply"
    return None


@accelerator
def diffusers_sana_block(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "SanaTransformerBlock"):
        return None
    reason = (_not_plain_layer_norm("norm1", module.norm1) or _not_plain_layer_norm("norm2", module.norm2)
              or _not_diffusers_forward(module) or _skipped_hooks("norm1", module.norm1)
              or _skipped_hooks("norm2", module.norm2) or op_not_selected(_LAYER_NORM_OP, ops))
    if reason:
        return reason
    forward = _fused_sana_block_forward(BackendScope(backend), module.forward)
    return replace_forward(module, types.MethodType(forward, module), "SanaTransformerBlock.norm1+modulation, "
                           "norm2+modulation", "fastgen fused forward", _LAYER_NORM_OP)


@accelerator
def diffusers_sana_output_norm(module: nn.Module, backend: str, ops: frozenset) -> Union[None, Swap, str]:
    if not is_diffusers(module, "SanaModulatedNorm"):
        return None
    reason = (_not_plain_layer_norm("norm", module.norm) or _not_diffusers_forward(module)
              or _skipped_hooks("norm", module.norm) or op_not_selected(_LAYER_NORM_OP, ops))
    if reason:
        return reason
    forward = _fused_sana_output_norm_forward(BackendScope(backend), module.forward)
    return replace_forward(module, types.MethodType(forward, module), "SanaModulatedNorm",
                           "fastgen fused forward", _LAYER_NORM_OP)
