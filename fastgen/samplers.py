"""Samplers shared by the reference models.

A model is passed as `model_fn(x, t, cond) -> prediction`, with x the current sample (B, ...),
t a (B,) float tensor of times and cond whatever the model needs besides x and t: a tensor, or a
dict / tuple / list of tensors (for example a caption and its mask), batched along dim 0.
Wrapping a network into this form (scaling t to its timestep range, unpacking cond) is the
caller's job, which keeps the samplers independent of any one model.

Classifier-free guidance: pred = pred_u + s (pred_c - pred_u), where pred_u is the prediction
under `uncond` and pred_c under `cond`. Both halves are computed in ONE model call on the
batch concatenated as [uncond; cond], which keeps the GPU busy with one large batch instead of
two small ones.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _concat_halves(uncond: Any, cond: Any, where: str = "") -> Any:
    """[uncond; cond] along dim 0, leaf by leaf through dicts, tuples and lists. `where` is the
    position of this leaf inside cond, for error messages."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor) or uncond.shape != cond.shape:
            got = tuple(uncond.shape) if isinstance(uncond, torch.Tensor) else type(uncond).__name__
            raise ValueError(f"uncond{where} must be a tensor shaped like cond{where}, {tuple(cond.shape)}; got {got}")
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError(f"uncond{where} must be a dict with the keys of cond{where}: {sorted(cond)}")
        return {key: _concat_halves(uncond[key], cond[key], f"{where}[{key!r}]") for key in cond}
    if isinstance(cond, (tuple, list)):
        if not isinstance(uncond, (tuple, list)) or len(uncond) != len(cond):
            raise ValueError(f"uncond{where} must be a sequence of {len(cond)} items like cond{where}")
        return type(cond)(_concat_halves(u, c, f"{where}[{i}]") for i, (u, c) in enumerate(zip(uncond, cond)))
    if cond is None and uncond is None:
        return None
    raise TypeError(
        f"cond{where} must be a tensor, a dict / tuple / list of tensors, or None; got {type(cond).__name__}"
    )


def guided_prediction(
    model_fn: ModelFn,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The model's prediction at (x, t), with classifier-free guidance when `uncond` is given and
    `guidance_scale` != 1 (at scale 1 the guided prediction is the conditional one, so the
    unconditional half is not computed)."""
    if uncond is None or guidance_scale == 1.0:
        return model_fn(x, t, cond)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), _concat_halves(uncond, cond))
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def flow_matching_timesteps(
    num_steps: int, shift: float = 1.0, device: Optional[torch.device] = None
) -> torch.Tensor:
    """num_steps + 1 times from 1 (noise) down to 0 (data): an even grid s passed through the
    time shift t = shift s / (1 + (shift - 1) s), which spends more steps at high noise for
    shift > 1 (SD3; SANA uses shift 3 at 1024 px). float32.

    diffusers' FlowMatchEulerDiscreteScheduler builds its grid slightly differently (its last
    nonzero time is shifted twice), so its schedule differs from this one near t = 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)
    return shift * grid / (1 + (shift - 1) * grid)


def flow_matching_euler(
    model_fn: ModelFn,
    noise: torch.Tensor,
    *,
    timesteps: Optional[torch.Tensor] = None,
    num_steps: Optional[int] = None,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    cond: Any = None,
    uncond: Any = None,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) with Euler steps x <- x + (t_next - t) v from x = `noise` at
    timesteps[0] to timesteps[-1].

    The model predicts the velocity v of the straight path x_t = (1 - t) x_0 + t noise, that is
    v = noise - x_0 (rectified flow as in SANA and SD3), so the default schedule runs from t = 1
    to t = 0. Give either `timesteps` (1-D, at least two times, in order of integration) or
    `num_steps` (with `shift`, see `flow_matching_timesteps`). The sample keeps the dtype of
    `noise`; guidance is as in the module docstring."""
    if (timesteps is None) == (num_steps is None):
        raise ValueError("give exactly one of timesteps and num_steps")
    if timesteps is None:
        timesteps = flow_matching_timesteps(num_steps, shift, device=noise.device)
    timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=noise.device)
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must be 1-D with at least 2 entries; got shape {tuple(timesteps.shape)}")

    x = noise
    batch = noise.shape[0]
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        velocity = guided_prediction(model_fn, x, t.expand(batch), cond, uncond, guidance_scale)
        x = x + (t_next - t).to(x.dtype) * velocity.to(x.dtype)
    return x
