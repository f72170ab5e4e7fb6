"""`fastgen profile`: model discovery, the classification of profiler events into op families,
their attribution, the table, and the CPU run of every model module's tiny config."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastgen import cli, profile
from model_checks import example_step_call

MODELS = sorted(profile.discover_models())
# The families SANA's step must show: its three fastgen op families and the plain-torch rest.
SANA_FAMILIES = ("ada_norm", "cross_attention", "linear_attention", "convolution", "gemm", "elementwise/other")


def test_sana_is_discovered_with_the_contract():
    assert "sana" in MODELS
    assert profile.resolve_model("sana").__name__ == "fastgen.models.sana"


def test_sana_example_step_is_one_guidance_batch_denoising_call(generator):
    from fastgen.models import sana

    model, (latents, caption, timestep, mask) = example_step_call(sana, 3, generator)
    assert latents.shape == (6, 4, 8, 8), "2 x batch latents, 256 px / 32 for tiny by default"
    assert caption.shape == (6, sana.EXAMPLE_CAPTION_TOKENS, 24) and latents.dtype == caption.dtype == torch.float64
    assert mask[:3].all() and mask[3:].sum(1).tolist() == [100] * 3, "the unconditional half is padded"
    assert torch.equal(timestep, torch.full((6,), 500.0))
    assert sana.example_step(model, resolution=512)().shape[-1] == 16
    for bad in ({"batch": 0}, {"resolution": 96}, {"resolution": 32}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sana.example_step(model, **bad)


# Each tiny config's default image side, from its config (sana: sample_size 8 x 32; ldm_unet,
# flux, sd3: sample_size 8 x the VAE's 8; dcae: latents of 8 x 32; vqgan: EXAMPLE_RESOLUTION; var:
# its tokenizer's; the others: the config's).
TINY_RESOLUTIONS = {"adm_unet": 16, "autoencoder_kl": 32, "dcae": 256, "flux": 64, "ldm_unet": 64, "sana": 256,
                    "sd3": 64, "stylegan": 16, "stylegan2": 16, "stylegan3": 32, "var": 12, "var_vqvae": 12, "vqgan": 256}


def test_every_model_names_its_default_resolution_and_checks_others():
    assert set(TINY_RESOLUTIONS) == set(MODELS)
    for name, module in profile.discover_models().items():
        model = module.build("tiny")
        default = TINY_RESOLUTIONS[name]
        assert module.example_resolution(model) == default == module.example_resolution(model, default), name
        for bad in (default + 1, -default, float(default), True):
            with pytest.raises(ValueError, match="resolution must be"):
                module.example_resolution(model, bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
@pytest.mark.parametrize("model", MODELS)
def test_cpu_profile_of_every_model_writes_table_summary_and_trace(model, tmp_path, capsys):
    summary = profile.profile(model, steps=1, warmup=1, out_dir=tmp_path)
    out = capsys.readouterr().out
    assert "kernel timings need a GPU" in out
    assert summary["resolution"] == TINY_RESOLUTIONS[model] and f"{TINY_RESOLUTIONS[model]} px" in out
    assert summary["config"] == "tiny" and summary["device"] == "cpu" and summary["gpu"] is None
    assert list(summary["runs"]) == ["eager"], "on CPU only the reference is profiled"
    eager = summary["runs"]["eager"]
    assert eager["backend"] == "reference" and eager["step_ms"] > 0

    families = {row["family"]: row for row in summary["families"]}
    assert set(families) == set(eager["families"])
    assert all(row["eager_ms"] > 0 for row in families.values())
    assert any(row["fastgen_op"] for row in families.values()), "the model runs no fastgen op"
    assert sum(row["eager_share"] for row in families.values()) == pytest.approx(1.0)
    assert eager["total_ms"] == pytest.approx(sum(eager["families"].values()))
    for family in families:
        assert family in out, f"{family} missing from the printed table"

    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    trace = json.loads((tmp_path / eager["trace"]).read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("fastgen::") for name in names), "the trace holds no fastgen op"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_sana_step_shows_its_op_families(tmp_path):
    summary = profile.profile("sana", steps=1, warmup=1, resolution=256, out_dir=tmp_path)
    families = summary["runs"]["eager"]["families"]
    for family in SANA_FAMILIES:
        assert families.get(family, 0) > 0, f"{family}: {families}"


OPS = {"linear_attention": "linear_attention", "linear_attention_backward": "linear_attention",
       "cross_attention": "cross_attention", "cross_attention_forward": "cross_attention",
       "ada_layer_norm": "ada_norm", "pixel_unshuffle_channel_avg": "shortcut"}
KERNELS = {"_output_kernel": "linear_attention"}


@pytest.mark.parametrize("names, family", [
    (["aten::mm", "aten::linear"], "gemm"),
    (["aten::addmm"], "gemm"),
    (["aten::bmm", "aten::matmul", "aten::einsum"], "gemm"),
    (["aten::mkldnn_convolution", "aten::_convolution", "aten::convolution", "aten::conv2d"], "convolution"),
    (["sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "aten::cudnn_convolution"], "convolution"),
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "aten::mm"], "gemm"),
    (["nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"], "gemm"),
    (["void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)"], "gemm"),
    (["void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>()", "aten::add"],
     "elementwise/other"),
    (["void at::native::unrolled_elementwise_kernel<convert_float_to_bfloat16>()", "aten::copy_", "aten::to"],
     "elementwise/other"),
    (["Memcpy DtoD (Device -> Device)"], "elementwise/other"),
    # Inside a fastgen op the op decides, whatever ran inside it (the reference's matmuls too).
    (["aten::bmm", "aten::einsum", "fastgen::cross_attention"], "cross_attention"),
    (["_output_kernel", "fastgen::linear_attention"], "linear_attention"),
    (["aten::mm", "fastgen::cross_attention_forward", "fastgen::cross_attention"], "cross_attention"),
    (["aten::mul", "fastgen::linear_attention_backward.default"], "linear_attention"),
    # A fastgen op calling another's public function: the time is the outer op's, the one the model called.
    (["aten::mm", "fastgen::linear_attention", "fastgen::ada_layer_norm"], "ada_norm"),
    # Outside any fastgen op a Triton kernel is known by name, a CUDA kernel by its family's namespace.
    (["_output_kernel"], "linear_attention"),
    (["void fastgen::kernels::shortcut::(anonymous namespace)::unshuffle_avg_kernel<__nv_bfloat16>(long, Geometry)"],
     "shortcut"),
    (["void fastgen::(anonymous namespace)::unshuffle_avg_kernel<__nv_bfloat16>(long, Geometry)"],
     "elementwise/other"),
    (["void fastgen::kernels::not_a_family::(anonymous namespace)::some_kernel(long)"], "elementwise/other"),
    # Names the maps do not know fall through to the generic families.
    (["_query_grad_kernel"], "elementwise/other"),
    (["aten::mm", "fastgen::not_an_op"], "gemm"),
    ([], "elementwise/other"),
])
def test_classify(names, family):
    assert profile.classify(names, OPS, KERNELS) == family


def test_classify_with_the_real_op_and_kernel_maps():
    ops, kernels = profile.op_families(), profile.kernel_families()
    assert ops["linear_attention_backward"] == "linear_attention"
    assert ops["ada_layer_norm"] == ops["ada_group_norm"] == "ada_norm"
    assert kernels["_layer_norm_kernel"] == "ada_norm"
    assert profile.classify(["void fastgen::kernels::vq::(anonymous namespace)::search_kernel<float>(Args)"]) == "vq"
    assert "_query_grad_kernel" not in kernels, "a name two families share must not pick one"
    assert not any(name.endswith("_rows") for name in kernels), "jit helpers are never launched"
    assert profile.classify(["_nearest_kernel"]) == "vq"
    assert profile.classify(["aten::mm", "fastgen::trms2d"]) == "rms_norm_2d"


def _event(name, parent=None, device="CPU", self_us=0.0, id=0, linked=0, span=(0.0, 0.0), activity="cpu_op",
           is_async=False):
    return SimpleNamespace(name=name, cpu_parent=parent, device_type=SimpleNamespace(name=device),
                           self_cpu_time_total=self_us, id=id, linked_correlation_id=linked,
                           time_range=SimpleNamespace(start=span[0], end=span[1]), activity_type=activity,
                           is_async=is_async)


def test_attribute_cpu_self_times_by_enclosing_op():
    op = _event("fastgen::linear_attention", self_us=1.0)
    inner = _event("aten::bmm", parent=op, self_us=5.0)
    linear = _event("aten::linear", self_us=0.5)
    mm = _event("aten::mm", parent=linear, self_us=3.0)
    add = _event("aten::add", self_us=2.0)
    background = _event("some async op", self_us=100.0, is_async=True)
    totals = profile.attribute([op, inner, linear, mm, add, background], device_times=False)
    assert totals == {"linear_attention": 6.0, "gemm": 3.5, "elementwise/other": 2.0}


def test_attribute_device_kernels_to_their_launching_op():
    op = _event("fastgen::cross_attention", id=7)
    launch = _event("aten::empty", parent=op, id=8)
    # A CUDA runtime event carries the driver's correlation id, which can equal an op's id: it is
    # linked to an op itself and must never be taken for a launcher.
    runtime = _event("cudaLaunchKernel", id=8, linked=9)
    mm = _event("aten::mm", id=9)
    kernels = [
        _event("triton_poi_fused_0", device="CUDA", linked=8, span=(10.0, 14.0), activity="kernel"),
        _event("nvjet_tst_128x256", device="CUDA", linked=9, span=(20.0, 21.5), activity="kernel"),
        _event("_layer_norm_kernel", device="CUDA", linked=0, span=(30.0, 30.25), activity="kernel"),
        _event("Memset (Device)", device="CUDA", linked=99, span=(40.0, 41.0), activity="gpu_memset"),
        _event("fastgen.step", device="CUDA", linked=0, span=(0.0, 50.0), activity="gpu_user_annotation"),
    ]
    totals = profile.attribute([op, launch, runtime, mm, *kernels], device_times=True)
    assert totals == pytest.approx({"cross_attention": 4.0, "gemm": 1.5, "ada_norm": 0.25, "elementwise/other": 1.0})


def test_table_with_both_runs_shows_speedups_and_shares(tmp_path):
    eager = profile.Run("eager", "reference", {"linear_attention": 6.0, "gemm": 3.0, "elementwise/other": 1.0},
                        11.0, tmp_path / "eager.trace.json")
    fast = profile.Run("fastgen", "auto", {"linear_attention": 2.0, "gemm": 3.0}, 6.0, tmp_path / "f.json")
    rows = profile.summarize([eager, fast])
    assert [row["family"] for row in rows] == ["linear_attention", "gemm", "elementwise/other"]
    by_family = {row["family"]: row for row in rows}
    assert by_family["linear_attention"]["speedup"] == pytest.approx(3.0)
    assert by_family["linear_attention"]["fastgen_share"] == pytest.approx(0.4)
    assert by_family["gemm"]["eager_share"] == pytest.approx(0.3)
    assert by_family["elementwise/other"]["speedup"] is None, "no fastgen time: no ratio"
    table = profile.format_table(rows, [eager, fast], "kernel")
    assert "3.00x" in table and "2.00x" in table, table  # linear attention; total 10 ms -> 5 ms
    assert "1.83x" in table, "wall-clock 11 ms -> 6 ms"
    assert "40.0%" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cli_profile_on_cpu(tmp_path, capsys):
    code = cli.main(["profile", "sana", "--steps", "1", "--warmup", "1", "--resolution", "256", "--out",
                     str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "kernel timings need a GPU" in out and "linear_attention" in out
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "eager.trace.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["profile", "no_such_model"], r"unknown model 'no_such_model'; available: .*sana"),
    (["profile", "sana", "--config", "sana-9000b"], r"unknown config 'sana-9000b' for model 'sana'; "
                                                     r"available: sana-600m, sana-1600m, tiny"),
    (["profile", "sana", "--resolution", "100"], r"resolution must be a positive multiple of 64"),
    (["profile", "sana", "--steps", "0"], r"steps must be an int >= 1; got 0"),
    (["profile", "sana", "--out", "{a_file}"], r"cannot use .*a_file as the output directory: File exists"),
])
def test_cli_profile_errors_name_the_problem(argv, message, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [arg.format(a_file=a_file) for arg in argv]
    assert cli.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgen profile: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("bad, message", [
    ({"backend": "reference"}, "backend must be one of auto, triton, cuda"),
    ({"dtype": "int8"}, "dtype must be one of float32, float16, bfloat16; got 'int8'"),
    ({"warmup": 0}, "warmup must be an int >= 1 (the first step pays one-time costs: kernel compilation, "
                    "autotuning); got 0"),
    ({"steps": True}, "steps must be an int >= 1; got True"),
    ({"batch": 0}, "batch must be an int >= 1; got 0"),
])
def test_profile_argument_errors(bad, message, tmp_path):
    with pytest.raises(profile.ProfileError, match=re.escape(message)):
        profile.profile("sana", out_dir=tmp_path, **bad)
    assert not list(tmp_path.iterdir()), "nothing runs or is written before the arguments are checked"


def test_cli_profile_rejects_reference_as_the_compared_backend(capsys):
    with pytest.raises(SystemExit):
        cli.main(["profile", "sana", "--backend", "reference"])
    assert "invalid choice" in capsys.readouterr().err


def test_every_cuda_kernel_is_in_its_familys_namespace():
    """A CUDA kernel's name in a trace carries its namespace, fastgen::kernels::<family>: that is how
    classify attributes it without the sources (csrc/ is not installed)."""
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    for source in sorted(csrc.glob("*.cu")):
        text = source.read_text()
        opened, closed = text.find(f"namespace kernels::{source.stem} {{"), text.find(f"}}  // namespace kernels::{source.stem}")
        kernels = [m.start() for m in re.finditer(r"__global__", text)]
        assert kernels and 0 <= opened < min(kernels) and max(kernels) < closed, source.name
