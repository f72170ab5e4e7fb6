"""Fuzz inputs for every op, drawn by hypothesis from the op's check cases (`op.check_cases()`).

A drawn input starts from a check case's arguments and varies them in three independent ways,
each an *input class* that a test can leave out of its draw (`INPUT_CLASSES`):

- sizes: any size the op lets vary (`SIZES`) set to 1, a small odd or prime number, a power
  of two or one past it ("odd sizes"), or to 0 where the op accepts an empty dimension
  ("empty"). A resized tensor gets fresh standard-normal values.
- layouts, per tensor argument, per-channel weights and biases included: contiguous,
  channels_last, a permuted dimension order ("permuted"), every other element along one
  dimension of a wider tensor one element in ("strided"), contiguous one element into its
  storage ("offset"), or one slice repeated along a dimension by a zero stride ("expanded").
  The elements a strided or offset view skips hold NaN, so reading one shows in the output.
  Every layout keeps the tensor's values except "expanded", which repeats the first slice
  (the arguments in `VALUE_STRUCTURED`, whose values the op checks, never take it)
  (stride 0 can hold nothing else); either way the reference sees the values the kernel sees.
- values, in one floating tensor argument: a few elements or all of them NaN, +-inf, huge,
  subnormal, or zero. "huge" is as large as a float32 computation of a sum of squares or of
  products of two such values stays finite in (2^32, and 1/8 of float16's largest value).

Every random choice is a hypothesis draw or comes from a torch generator seeded by one, so a
failing input is replayed by hypothesis and its minimal example prints as a `Recipe`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Optional

import torch
from hypothesis import assume
from hypothesis import strategies as st

from fastgen.ops.registry import Op, random_tensor

SIZE_CLASSES = ("odd sizes", "empty")
LAYOUTS = ("contiguous", "channels_last", "permuted", "strided", "offset", "expanded")
VALUE_CLASSES = ("nan", "inf", "huge", "subnormal", "zero")
INPUT_CLASSES = SIZE_CLASSES + LAYOUTS + VALUE_CLASSES

# Sizes a varied dimension takes besides 0: 1, odd numbers and primes, powers of two and their
# neighbours, up to a little past the 128-wide tiles of the kernels.
SIZE_CHOICES = (1, 2, 3, 5, 7, 11, 13, 16, 17, 31, 32, 33, 37, 63, 64, 65, 97, 127, 128, 131)
# Resized inputs stay at most this large: the Triton interpreter and the CUDA emulation run a
# program per tile on the CPU.
MAX_ELEMENTS = 1 << 12
AFFECTED_ELEMENTS = (1, 3, "all")
# Arguments whose values form a structure the op checks (cross_attention's block ends increase
# strictly): they take every layout but "expanded", which repeats one value.
VALUE_STRUCTURED = {"cross_attention": ("causal_block_ends",)}


@dataclass(frozen=True)
class Size:
    """A size an op lets vary. Each carrier is (argument, dim) or (argument, dim, multiplier):
    the argument's dimension `dim` has that size, times the int argument `multiplier` where one
    is named. `dim` may name the int argument that holds it (bias_act's `dim`), or be None for an
    int argument that is itself the size (out_channels). `largest` caps the sizes drawn."""

    carriers: tuple
    can_be_empty: bool = True
    largest: int = max(SIZE_CHOICES)


def _filter_taps(argument: str, dim: int) -> Size:
    """A filter's taps along one dim: real filters have a dozen or two, and each new filter size
    costs the float16 reference a oneDNN kernel generation that grows with it."""
    return Size(((argument, dim),), False, largest=17)


def _batch(*arguments: str) -> Size:
    return Size(tuple((argument, 0) for argument in arguments))


def _vq_sizes() -> dict:
    return {"rows": _batch("z"), "codes": Size((("codebook", 0),), False),
            "dim": Size((("z", 1), ("codebook", 1)), False)}


def _attention_sizes(*key_tensors: str) -> dict:
    qkv = ("q", "k", "v")
    return {
        "batch": _batch(*qkv, *key_tensors[2:]),
        "queries": Size((("q", 1),)),
        "keys": Size(tuple((name, 1) for name in key_tensors)),
        "heads": Size(tuple((name, 2) for name in qkv), False),
        "head dim": Size(tuple((name, 3) for name in qkv), False),
    }


def _shortcut_sizes(small_side: str) -> dict:
    """pixel_unshuffle_channel_avg's output (its residual) is `factor` times smaller than x in
    height and width, channel_dup_pixel_shuffle's `factor` times larger: `small_side` is the
    tensor whose height and width are the varied size itself."""
    large_side = "residual" if small_side == "x" else "x"
    return {
        "batch": _batch("x", "residual"),
        "in channels": Size((("x", 1),), False),
        "out channels": Size((("out_channels", None), ("residual", 1)), False),
        **{side: Size(((small_side, dim), (large_side, dim, "factor")))
           for side, dim in (("height", 2), ("width", 3))},
    }


# Per op, the sizes that may vary. Not empty: channels (conv2d rejects 0 groups in the filters'
# references), group norm positions (torch's group_norm backward gives the weight a NaN gradient
# for an empty group), attention heads and head dims, codes and code dims.
SIZES = {
    "ada_group_norm": {
        "batch": _batch("x", "scale", "shift"),
        "channels per group": Size((("x", 1, "num_groups"), ("scale", 1, "num_groups"), ("shift", 1, "num_groups"),
                                    ("weight", 0, "num_groups"), ("bias", 0, "num_groups")), False),
        "positions": Size((("x", 2),), False),
        "columns": Size((("x", 3),), False),
    },
    "ada_layer_norm": {
        "batch": _batch("x", "scale", "shift"),
        "tokens": Size((("x", 1),)),
        "channels": Size((("x", 2), ("scale", 1), ("shift", 1)), False),
    },
    "gated_residual_ada_layer_norm": {
        "batch": _batch("x", "branch", "gate", "scale", "shift"),
        "tokens": Size((("x", 1), ("branch", 1))),
        "channels": Size((("x", 2), ("branch", 2), ("gate", 1), ("scale", 1), ("shift", 1)), False),
    },
    "bias_act": {
        "batch": _batch("x"),
        "channels": Size((("x", "dim"), ("b", 0)), False),
        "height": Size((("x", 2),)),
        "width": Size((("x", 3),)),
    },
    "cross_attention": _attention_sizes("k", "v", "key_padding_mask"),
    "linear_attention": _attention_sizes("k", "v"),
    "upfirdn2d": {
        "batch": _batch("x"),
        "channels": Size((("x", 1),), False),
        "height": Size((("x", 2),), False),
        "width": Size((("x", 3),), False),
        "filter height": _filter_taps("f", 0),
        "filter width": _filter_taps("f", 1),
    },
    "filtered_lrelu": {
        "batch": _batch("x"),
        "channels": Size((("x", 1), ("b", 0)), False),
        "height": Size((("x", 2),), False),
        "width": Size((("x", 3),), False),
        "up filter height": _filter_taps("fu", 0),
        "up filter width": _filter_taps("fu", 1),
        "down filter height": _filter_taps("fd", 0),
        "down filter width": _filter_taps("fd", 1),
    },
    "trms2d": {
        "batch": _batch("x"),
        "channels": Size((("x", 1), ("weight", 0), ("bias", 0)), False),
        "height": Size((("x", 2),)),
        "width": Size((("x", 3),)),
    },
    # The head dim also sizes the (L, D/2) RoPE tables, which no carrier can express: resizing
    # it fits only the cases without RoPE (the others are rejected and drawn again).
    "qk_norm_rope": {
        "batch": _batch("q", "k"),
        "tokens": Size((("q", 1), ("k", 1), ("cos", 0), ("sin", 0))),
        "heads": Size((("q", 2), ("k", 2))),
        "head dim": Size((("q", 3), ("k", 3), ("weight_q", 0), ("weight_k", 0)), False),
    },
    "pixel_unshuffle_channel_avg": _shortcut_sizes(small_side="residual"),
    "channel_dup_pixel_shuffle": _shortcut_sizes(small_side="x"),
    "vq_nearest": _vq_sizes(),
    "vq_quantize": _vq_sizes(),
}


def argument_names(op: Op) -> tuple:
    """The op's argument names, in the order of its check cases' arguments."""
    schema = getattr(torch.ops.fastgen, op.name).default._schema
    return tuple(argument.name for argument in schema.arguments)


@dataclass
class Recipe:
    """How a fuzz input was made, as hypothesis prints it: the check case, the seed of its values,
    the sizes changed, the layout of every tensor argument not left as the case made it, and the
    special values. `args` (not printed) are the op's arguments."""

    case: str
    seed: int
    sizes: dict
    layouts: dict
    values: Optional[tuple]
    args: tuple = field(repr=False)

    def _repr_pretty_(self, printer, cycle) -> None:
        # Hypothesis prints a dataclass field by field, tensors included; repr leaves `args` out.
        printer.text(repr(self))


def _fresh(like: torch.Tensor, shape: list, generator: torch.Generator) -> torch.Tensor:
    if like.dtype == torch.bool:
        return (torch.rand(shape, generator=generator) < 0.75).to(like.device)
    return random_tensor(tuple(shape), "contiguous", like.device, like.dtype, generator)


def resized(op: Op, args: tuple, sizes: dict, generator: torch.Generator) -> Optional[tuple]:
    """args with each size in `sizes` ({name in SIZES[op.name]: new size}) set on every carrier
    present; resized tensors get fresh values. None where a tensor would pass MAX_ELEMENTS,
    checked before allocating: the sizes drawn together can ask for gigabytes (131 x 131 x 131
    x 1024 channels), which the fresh random values would touch."""
    names = argument_names(op)
    args = list(args)
    shapes = {i: list(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    for name, size in sizes.items():
        for argument, dim, *multiplier in SIZES[op.name][name].carriers:
            position = names.index(argument)
            value = size * math.prod(args[names.index(m)] for m in multiplier)
            if dim is None:
                args[position] = value
                continue
            if isinstance(dim, str):
                dim = args[names.index(dim)]
            shape = shapes.get(position)
            if shape is not None and -len(shape) <= dim < len(shape):
                shape[dim] = value
    if any(math.prod(shape) > MAX_ELEMENTS for shape in shapes.values()):
        return None
    for position, shape in shapes.items():
        if list(args[position].shape) != shape:
            args[position] = _fresh(args[position], shape, generator)
    return tuple(args)


def _garbage(like: torch.Tensor, shape) -> torch.Tensor:
    """Storage for a view of `like`'s values whose skipped elements would show if read."""
    if like.is_floating_point():
        return like.new_full(shape, float("nan"))
    return like.new_full(shape, True if like.dtype == torch.bool else -1)


def laid_out(t: torch.Tensor, layout: str, dim: int = 0, order: tuple = ()) -> torch.Tensor:
    """t stored as `layout` (one of LAYOUTS); `dim` is the strided or expanded dimension and
    `order` the permuted dimension order."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":
        return t.permute(order).contiguous().permute(tuple(order.index(d) for d in range(t.dim())))
    if layout == "strided":
        shape = list(t.shape)
        shape[dim] = 2 * t.shape[dim] + 1
        view = _garbage(t, shape).narrow(dim, 1, 2 * t.shape[dim])[(slice(None),) * dim + (slice(None, None, 2),)]
        return view.copy_(t)
    if layout == "offset":
        return _garbage(t, (t.numel() + 1,))[1:].view(t.shape).copy_(t)
    if layout == "expanded":
        return t.narrow(dim, 0, 1).expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


def special_values(value_class: str, dtype: torch.dtype, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` float64 values of `value_class` for a tensor of `dtype`, with random signs."""
    normal = torch.randn(count, generator=generator, dtype=torch.float64)
    if value_class == "nan":
        return torch.full((count,), float("nan"), dtype=torch.float64)
    if value_class == "inf":
        return normal.sign() * float("inf")
    if value_class == "huge":
        return normal * min(torch.finfo(dtype).max / 8, 2.0**32)
    if value_class == "subnormal":
        return normal * (torch.finfo(dtype).tiny / 4)
    if value_class == "zero":
        return torch.zeros(count, dtype=torch.float64)
    raise ValueError(f"unknown value class {value_class!r}")


def with_values(t: torch.Tensor, value_class: str, affected, generator: torch.Generator) -> torch.Tensor:
    """A copy of t with `affected` elements (a count, or "all") of `value_class`."""
    flat = t.detach().to(torch.float64).flatten().cpu()
    count = flat.numel() if affected == "all" else min(affected, flat.numel())
    where = torch.randperm(flat.numel(), generator=generator)[:count]
    flat[where] = special_values(value_class, t.dtype, count, generator)
    return flat.view(t.shape).to(device=t.device, dtype=t.dtype)


def _fits(op: Op, args: tuple) -> bool:
    """Whether every tensor stays within MAX_ELEMENTS, and the op accepts these arguments."""
    if any(a.numel() > MAX_ELEMENTS for a in args if isinstance(a, torch.Tensor)):
        return False
    try:
        op.allocate_output(*args)
    except (ValueError, TypeError):
        return False
    return True


def _layout_choices(t: torch.Tensor, allowed) -> list:
    choices = ["as made", *(layout for layout in LAYOUTS if allowed(layout))]
    if t.dim() != 4:
        choices = [c for c in choices if c != "channels_last"]
    if t.dim() < 2:
        choices = [c for c in choices if c != "permuted"]
    if not any(size > 1 for size in t.shape):
        choices = [c for c in choices if c != "expanded"]
    return choices


@st.composite
def fuzz_inputs(draw, op: Op, device: torch.device, dtype: torch.dtype,
                excluded: Collection[tuple] = ()) -> Recipe:
    """A `Recipe` of arguments for `op` on `device` in `dtype`. `excluded` holds (input class,
    argument name or None for every argument) pairs the draw leaves out."""
    def allowed(input_class: str, argument: Optional[str] = None) -> bool:
        return (input_class, None) not in excluded and (input_class, argument) not in excluded

    names = argument_names(op)
    case = draw(st.sampled_from(op.check_cases()))
    seed = draw(st.integers(0, 2**63 - 1))
    generator = torch.Generator().manual_seed(seed)
    args = case.make_args(device, dtype, generator)

    choices = SIZE_CHOICES if allowed("odd sizes") else ()
    sizes = {}
    for name, size in SIZES[op.name].items():
        options = [n for n in choices if n <= size.largest] + [0] * (size.can_be_empty and allowed("empty"))
        if options:
            value = draw(st.one_of(st.none(), st.sampled_from(options)))
            if value is not None:
                sizes[name] = value
    args = resized(op, args, sizes, generator)
    assume(args is not None)
    args = list(args)
    assume(_fits(op, args))

    values = None
    floating = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    value_options = [(value_class, names[i]) for value_class in VALUE_CLASSES for i in floating
                     if allowed(value_class, names[i])]
    if value_options and draw(st.booleans()):
        value_class, argument = draw(st.sampled_from(value_options))
        values = (value_class, argument, draw(st.sampled_from(AFFECTED_ELEMENTS)))
        position = names.index(argument)
        args[position] = with_values(args[position], value_class, values[2], generator)

    layouts = {}
    for i, t in enumerate(args):
        if not isinstance(t, torch.Tensor):
            continue
        keeps_values = names[i] in VALUE_STRUCTURED.get(op.name, ())
        layout = draw(st.sampled_from(_layout_choices(
            t, lambda layout: allowed(layout, names[i]) and not (keeps_values and layout == "expanded"))))
        if layout == "as made":
            continue
        dim, order = 0, ()
        if layout == "strided":
            dim = draw(st.integers(0, t.dim() - 1))
            layouts[names[i]] = f"strided dim {dim}"
        elif layout == "expanded":
            dim = draw(st.sampled_from([d for d, size in enumerate(t.shape) if size > 1]))
            layouts[names[i]] = f"expanded dim {dim}"
        elif layout == "permuted":
            order = tuple(draw(st.permutations(range(t.dim()))))
            layouts[names[i]] = f"permuted {order}"
        else:
            layouts[names[i]] = layout
        args[i] = laid_out(t, layout, dim, order)
    return Recipe(case.label, seed, sizes, layouts, values, tuple(args))
