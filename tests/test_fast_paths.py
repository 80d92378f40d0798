"""Every fast path gives what the plain path gives, on the tiny presets (CPU, random init).

Tolerances (videos are uint8, latents float32):
- float32 paths (batched CFG, batched VAE decode, channels-last weights, dynamo capture): the same videos up to
  float rounding of batched kernels: latents within 1e-5, videos within 1 level of 255;
- bf16 frozen weights (sampling-only models, LoRA base weights) against float32 weights + bf16 autocast: the same
  DPO losses and MSEs within 2% (bf16 keeps 8 mantissa bits; autocast already rounds every GEMM input to bf16);
- LoRA layers feeding the adapter their bf16 input as is (no fp32 copy): bit-identical under autocast;
- LoRA layers adding the adapter in its GEMM (`FusedAddLoraLinear`): bit-identical in float32, gradients included;
  under bf16 autocast at least as close to the float32 result as peft's, DPO losses within 2%;
- norms in the input dtype (`norms_in_input_dtype`): exactly `nn.GroupNorm` / `nn.LayerNorm` in float32; bf16 out
  under bf16 autocast, within bf16 rounding of the float32 result; a bf16 VC2 DPO step within 2% of float32;
- a seed fixes its video whatever its batch (batch of 1 and of 4): within 1 level in float32, 2 levels in bf16.
`torch.compile` with inductor generates C++ on the CPU (minutes even for the tiny presets): here the "eager" backend
checks that dynamo captures the denoiser unchanged, a failing backend checks the eager fallback, and
`benchmarks/gpu.py` measures inductor on the GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from test_family_conformance import probe
from torch import nn

from actors.sampler import SamplerActor
from videodpo_ray.models import ModelConfig, build_model, families
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.models.modules import compile_module, hold_frozen_in, norms_in_input_dtype, weight_dtype
from videodpo_ray.stages.common import SamplingConfig
from videodpo_ray.training.step import dpo_step

pytestmark = pytest.mark.usefixtures("single_torch_thread")
PROMPTS = ["a red fox in the snow", "a city at night", "waves on a beach", "a cat on a sofa"]
SEEDS = [3, 5, 7, 11]
STEPS = 2


def build(family: str, **overrides) -> VideoDiffusionModel:
    return build_model(ModelConfig(family=family, variant="tiny", **overrides), seed=0)


def sampler(family: str, mixed_precision: str = "no") -> VideoDiffusionModel:
    model = build(family, mixed_precision=mixed_precision)
    model.freeze_for_sampling()
    return model


def max_level_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    return int((a.int() - b.int()).abs().max())


# --- bf16 frozen weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", families())
def test_sampling_only_models_hold_every_weight_in_bf16(family: str):
    model = sampler(family, "bf16")
    assert model.reference_denoiser is None and model.trainable_parameters() == []
    assert not any(p.requires_grad for p in model.parameters())
    keep = set(getattr(model.denoiser, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        kept = name.startswith("denoiser.") and keep & set(name.split("."))
        assert parameter.dtype == (torch.float32 if kept else torch.bfloat16), name
    videos = model.sample(PROMPTS[:1], SEEDS[:1], num_inference_steps=STEPS)
    assert videos.dtype == torch.uint8 and videos.shape[1:4] == model.video_size


@pytest.mark.parametrize("family, finetune", [(family, "full") for family in families()]
                         + [("vc2", "temporal"), ("t2v_turbo", "temporal")])
def test_the_bf16_reference_predicts_exactly_what_the_float32_policy_does_at_step_0(family, finetune, tmp_path):
    """Diffusion-DPO's reference is the initial policy: held in bf16 to save memory, it must still compute exactly
    what the float32 policy computes under bf16 autocast, on weights bf16 cannot represent (real checkpoints')."""
    original = build(family)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator))
    directory = original.save_pretrained(tmp_path / "weights")
    model = build_model(ModelConfig(family=family, variant="tiny", path=str(directory), finetune=finetune,
                                    mixed_precision="bf16"), seed=0)
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    copy_dtypes = {p.dtype for p in model.reference_denoiser.parameters()}
    assert torch.bfloat16 in copy_dtypes  # the copy's matmul weights: bf16, as autocast computes them anyway
    inputs = probe(original)  # the tiny size (a model loaded from a path samples at its family's full size)
    assert torch.equal(model.predict(*inputs), model.predict(*inputs, reference=True))


@pytest.mark.parametrize("family", families())
def test_lora_base_weights_are_bf16_and_the_adapter_float32(family: str):
    model = build(family, finetune="lora", lora={"rank": 4}, mixed_precision="bf16")
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable and all(p.dtype == torch.float32 for p in model.trainable_parameters())
    frozen = [p for p in model.denoiser.parameters() if id(p) not in trainable]
    assert frozen and {p.dtype for p in frozen} <= {torch.bfloat16, torch.float32}
    assert sum(p.numel() for p in frozen if p.dtype == torch.bfloat16) > 0.9 * sum(p.numel() for p in frozen)


def autocast_baseline(model: VideoDiffusionModel) -> VideoDiffusionModel:
    """The plain bf16 path the fast one replaces: frozen denoiser weights back in float32, under the same autocast."""
    hold_frozen_in(model.denoiser, torch.float32)
    return model


def perturb(model: VideoDiffusionModel) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def dpo_outputs(model: VideoDiffusionModel) -> dict[str, torch.Tensor]:
    """Loss and MSEs of one DPO step on two random videos, the policy perturbed away from the reference."""
    perturb(model)
    generator = torch.Generator().manual_seed(1)
    frames, height, width = model.video_size
    videos = torch.randint(0, 256, (2, frames, height, width, 3), dtype=torch.uint8, generator=generator)
    latents = model.encode_videos(videos)
    text = model.encode_prompts(PROMPTS[:1])
    output = dpo_step(model, latents[:1], latents[1:], text, None, beta_dpo=10.0,
                      generator=torch.Generator().manual_seed(0))
    return {"loss": output.loss.detach(), **output.metrics}


def assert_same_dpo(fast: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    for name in ("loss", "model_mse_win", "model_mse_lose", "ref_mse_win", "ref_mse_lose"):
        torch.testing.assert_close(fast[name], plain[name], rtol=0.02, atol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["vc2", "cogvideox", "wan"])  # t2v_turbo has VC2's UNet
def test_dpo_loss_with_bf16_lora_base_matches_float32_base_under_autocast(family: str):
    outputs = []
    for fast in (False, True):
        model = build(family, finetune="lora", lora={"rank": 4}, mixed_precision="bf16")
        outputs.append(dpo_outputs(model if fast else autocast_baseline(model)))
    plain, fast = outputs
    assert_same_dpo(fast, plain)


def with_lora_layers(model: VideoDiffusionModel, layer_class: type) -> VideoDiffusionModel:
    for layer in model._tuner_layers:
        layer.__class__ = layer_class
    return model


@pytest.mark.parametrize("family", ["vc2", "wan"])
def test_lora_layers_feed_the_adapter_their_input_as_is_with_the_same_result(family: str):
    """peft's cast of each adapted layer's bf16 input to the float32 adapter (an fp32 copy, cast back by autocast)
    is off: bit-identical predictions under bf16 autocast, with less cast traffic and no fp32 copies written."""
    from peft.tuners.lora import Linear

    traffic = load_benchmark("traffic")
    model = with_lora_layers(build(family, finetune="lora", lora={"rank": 4}, mixed_precision="bf16"), Linear)
    perturb(model)
    inputs = probe(model)
    counts = []
    for cast in (False, True):
        for layer in model._tuner_layers:
            layer.cast_input_dtype_enabled = cast
        counter = traffic.TrafficCounter()
        with torch.no_grad(), counter:
            counts.append((model.predict(*inputs), counter.bytes["cast"], counter.float32_written))
    (as_is, as_is_casts, as_is_fp32), (cast, casts, fp32) = counts
    assert torch.equal(as_is, cast)
    assert as_is_casts < casts and as_is_fp32 < fp32


def prediction_and_gradients(model: VideoDiffusionModel, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    prediction = model.predict(*inputs)
    prediction.float().square().mean().backward()
    return prediction.detach(), [parameter.grad.clone() for parameter in model.trainable_parameters()]


@pytest.mark.parametrize("family", ["vc2", "cogvideox", "wan"])
def test_lora_layers_adding_the_adapter_in_its_gemm_are_peft_exactly_in_float32(family: str):
    """`FusedAddLoraLinear` (the adapter's scaling and add in `torch.addmm`): the same predictions and the same
    adapter gradients as peft's `lora.Linear`, bit for bit, with less elementwise traffic; the state dict unchanged."""
    from peft.tuners.lora import Linear

    from videodpo_ray.models.lora_linear import FusedAddLoraLinear

    traffic = load_benchmark("traffic")
    model = build(family, finetune="lora", lora={"rank": 4, "alpha": 8})  # scaling 2
    assert {type(layer) for layer in model._tuner_layers} == {FusedAddLoraLinear}
    keys = model.denoiser.state_dict().keys()
    perturb(model)
    inputs = probe(model)
    results = []
    for layer_class in (Linear, FusedAddLoraLinear):
        with_lora_layers(model, layer_class)
        counter = traffic.TrafficCounter()
        with counter:
            results.append((*prediction_and_gradients(model, inputs), counter.bytes["elementwise"]))
    (plain, plain_gradients, plain_bytes), (fused, fused_gradients, fused_bytes) = results
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(fused_gradients, plain_gradients, strict=True))
    assert fused_bytes < 0.9 * plain_bytes
    assert model.denoiser.state_dict().keys() == keys
    references = [model.predict(*inputs, reference=True) for _ in (with_lora_layers(model, Linear),
                                                                     with_lora_layers(model, FusedAddLoraLinear))]
    assert torch.equal(*references)  # adapters off: the base layers' forward either way
    model.merge_lora()  # peft's merge, inherited: the merged base layers predict what the adapters did
    torch.testing.assert_close(model.predict(*inputs).detach(), fused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["vc2", "wan"])
def test_lora_layers_adding_the_adapter_in_its_gemm_round_once_under_bf16_autocast(family: str):
    """Under bf16 autocast peft rounds the up-projection, the scaling and the add to bf16; `torch.addmm` rounds
    once: its predictions are at least as close to the float32 model's, and a DPO step gives the same losses."""
    from peft.tuners.lora import Linear

    from videodpo_ray.models.lora_linear import FusedAddLoraLinear

    model = build(family, finetune="lora", lora={"rank": 4, "alpha": 8}, mixed_precision="bf16")
    perturb(model)
    inputs = probe(model)
    exact = copy.deepcopy(model)  # the same (bf16-rounded) weights, computed in float32 without autocast
    exact.config = exact.config.model_copy(update={"mixed_precision": "no"})
    hold_frozen_in(exact.denoiser, torch.float32)
    expected = exact.predict(*inputs).detach()
    fused, plain = (with_lora_layers(model, layer_class).predict(*inputs).detach()
                    for layer_class in (FusedAddLoraLinear, Linear))
    assert (fused - expected).abs().mean() <= (plain - expected).abs().mean()
    torch.testing.assert_close(fused, plain, rtol=0.02, atol=0.03)
    plain_dpo, fused_dpo = (
        dpo_outputs(with_lora_layers(build(family, finetune="lora", lora={"rank": 4}, mixed_precision="bf16"),
                                     layer_class)) for layer_class in (Linear, FusedAddLoraLinear))
    assert_same_dpo(fused_dpo, plain_dpo)


# --- norms in the input dtype ---------------------------------------------------------------------------------------
def test_input_dtype_norms_are_the_plain_norms_in_float32_and_stay_bf16_under_autocast():
    generator = torch.Generator().manual_seed(0)
    plain = nn.Sequential(nn.GroupNorm(4, 16), nn.LayerNorm(16))
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
    fast = copy.deepcopy(plain)
    norms_in_input_dtype(fast)
    assert [type(m).__name__ for m in fast] == ["InputDtypeGroupNorm", "InputDtypeLayerNorm"]
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = 3.0 + 2.0 * torch.randn((2, 16, 5, 16), generator=generator)
    assert torch.equal(fast(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), plain(x), rtol=0.02, atol=0.03)


def load_benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])  # the sampler; a full finetune's policy
def test_vc2_unet_under_cuda_bf16_autocast_has_no_float32_islands(weights: torch.dtype):
    """Counted on fake CUDA tensors with CUDA's autocast policy (benchmarks/traffic.py): with the plain norms a fifth
    of the forward's memory-bound traffic is float32 activations written; with the input-dtype norms almost none, and
    the GEMMs, convolutions and attention are untouched."""
    traffic = load_benchmark("traffic")
    before = traffic.unet_traffic("tiny", 2, plain=True, weights=weights)
    after = traffic.unet_traffic("tiny", 2, plain=False, weights=weights)
    for kind in ("gemm", "convolution", "attention"):
        assert after.bytes[kind] == before.bytes[kind], kind
    memory_bound = {name: sum(v for k, v in c.bytes.items() if k not in traffic.COMPUTE)
                    for name, c in (("before", before), ("after", after))}
    assert before.float32_written > 0.1 * memory_bound["before"]
    assert after.float32_written < 0.02 * memory_bound["after"]  # the timestep sinusoids
    assert memory_bound["after"] < 0.7 * memory_bound["before"]


def test_a_bf16_vc2_dpo_step_matches_float32_within_bf16_tolerance():
    plain, fast = (dpo_outputs(build("vc2", mixed_precision=precision)) for precision in ("no", "bf16"))
    assert_same_dpo(fast, plain)


@pytest.mark.parametrize("family", ["vc2", "wan"])  # a plain UNet; a transformer with `_keep_in_fp32_modules`
def test_weight_dtype_is_diffusers_dtype_without_the_walk(family: str):
    for overrides in ({}, {"finetune": "lora", "lora": {"rank": 4}, "mixed_precision": "bf16"}):
        denoiser = build(family, **overrides).denoiser
        assert weight_dtype(denoiser) == denoiser.dtype, overrides


# --- sampler: batched CFG, batched VAE decode, channels-last, compile ------------------------------------------------
def test_wan_guidance_in_one_call_equals_two_passes():
    model = sampler("wan")
    noise, generators = model.seeded_noise(SEEDS[:2], model.latent_shape(*model.video_size))
    text = model.encode_prompts(PROMPTS[:2])
    batched = model.denoise(noise, text, generators, num_inference_steps=3, guidance_scale=5.0)

    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(3)
    scheduler.set_begin_index(0)
    empty = model.empty_prompt_embedding().expand_as(text)
    latents = noise
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            t = timestep.expand(latents.shape[0])
            conditional, unconditional = model.predict(latents, t, text), model.predict(latents, t, empty)
            velocity = unconditional + 5.0 * (conditional - unconditional)
            latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    torch.testing.assert_close(batched, latents, rtol=0, atol=1e-5)


def per_frame_decode(model: VideoDiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """VC2's plain decode: one decoder call per frame index."""
    latents = latents / model.scale_factor
    frames = [model.vae.decode(latents[:, :, index]).sample for index in range(latents.shape[2])]
    pixels = torch.stack(frames, dim=1).clamp(-1.0, 1.0)
    return ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("frames_per_call", [1, 3, 16])
def test_vc2_decode_pooling_frames_equals_frame_by_frame(frames_per_call: int):
    model = sampler("vc2")
    model.vae_decode_frames = frames_per_call
    latents = torch.randn((3, 4, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_level_difference(model.decode_latents(latents), per_frame_decode(model, latents)) <= 1


@pytest.mark.parametrize("family", families())
def test_channels_last_weights_give_the_same_videos(family: str):
    model = sampler(family)
    plain = model.sample(PROMPTS[:2], SEEDS[:2], num_inference_steps=STEPS)
    model.use_channels_last()
    convolutions = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert max_level_difference(model.sample(PROMPTS[:2], SEEDS[:2], num_inference_steps=STEPS), plain) <= 1


@pytest.mark.parametrize("family", ["vc2", "wan"])
def test_dynamo_captures_what_sampling_compiles_unchanged(family: str):
    """`compile: true` in a sampler: the denoiser, plus VC2's 2D VAE decoder (Wan's 3D one stays eager)."""
    model = sampler(family)
    names = [name for name, _ in model.named_parameters()]
    plain = model.sample(PROMPTS[:1], SEEDS[:1], num_inference_steps=STEPS)
    model.compile_for_sampling(backend="eager")
    assert torch.equal(model.sample(PROMPTS[:1], SEEDS[:1], num_inference_steps=STEPS), plain)
    compiled = [module for module in (model.denoiser, model.vae.decoder) if "forward" in vars(module)]
    assert compiled == ([model.denoiser, model.vae.decoder] if family == "vc2" else [model.denoiser])
    assert [name for name, _ in model.named_parameters()] == names  # state dict unchanged


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    module = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    expected = module(x)
    compile_module(module, backend=broken_backend)
    with caplog.at_level(logging.WARNING, logger="videodpo_ray.models.base"):
        assert torch.equal(module(x), expected)
    assert "torch.compile of Linear failed, running eager" in caplog.text
    assert torch.equal(module(x), expected) and list(module.state_dict()) == ["weight", "bias"]


# --- a seed fixes its video whatever its batch -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "family, mixed_precision", [(family, "no") for family in families()] + [("vc2", "bf16"), ("wan", "bf16")]
)
def test_a_seed_fixes_its_video_in_a_batch_of_one_or_four(family: str, mixed_precision: str):
    model = sampler(family, mixed_precision)
    alone = model.sample(PROMPTS[:1], SEEDS[:1], num_inference_steps=STEPS)
    batched = model.sample(PROMPTS, SEEDS, num_inference_steps=STEPS)
    assert max_level_difference(batched[:1], alone) <= (1 if mixed_precision == "no" else 2)
    assert max_level_difference(batched[1:2], alone) > 2  # another seed and prompt: another video


def test_the_sampler_actor_samples_with_the_frozen_bf16_model():
    sampling = SamplingConfig(num_inference_steps=STEPS, channels_last=True)
    actor = SamplerActor(ModelConfig(family="vc2", variant="tiny", mixed_precision="bf16"), sampling)
    assert actor.model.reference_denoiser is None
    assert {p.dtype for p in actor.model.parameters()} == {torch.bfloat16}
    rows = actor(pa.table({"prompt": PROMPTS[:2], "seed": SEEDS[:2]}))
    assert rows.num_rows == 2 and all(rows.column("video").to_pylist())
    assert sampling.sample_kwargs() == {"num_frames": None, "height": None, "width": None,
                                        "num_inference_steps": STEPS, "guidance_scale": None}
