"""Wan2.1 behind the VideoDiffusionModel interface: tiny random models on the CPU, real diffusers classes.

Loading parity against a directory written by diffusers' own `WanPipeline.save_pretrained`, Flow-DPO against a
hand-written float64 reference, and sampling against `WanPipeline` with the same components, seed and steps.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file, save_file
from transformers import UMT5Config, UMT5EncoderModel

from videodpo_ray.errors import CheckpointError, ConfigError
from videodpo_ray.models import LoraConfig, ModelConfig, build_model
from videodpo_ray.models.t5_prompt_encoder import tiny_t5_tokenizer
from videodpo_ray.models.wan import Wan
from videodpo_ray.models.wan_presets import PRESETS, FlowTimestepSampling
from videodpo_ray.training.step import dpo_step

pytestmark = pytest.mark.usefixtures("single_torch_thread")
TINY = ModelConfig(family="wan", variant="tiny")
FRAMES, HEIGHT, WIDTH = PRESETS["tiny"].video_size
TEXT_LENGTH, TEXT_DIM = 16, 32


def tiny(seed: int = 0, **overrides) -> Wan:
    return build_model(TINY.model_copy(update=overrides), seed=seed)


def videos(batch: int, seed: int, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, height, width, 3), dtype=torch.uint8, generator=generator)


def pair_batch(model: Wan, num_pairs: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (num_pairs, *model.latent_shape(FRAMES, HEIGHT, WIDTH))
    return (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
            torch.randn(num_pairs, TEXT_LENGTH, TEXT_DIM, generator=generator))


def perturb(model: Wan, scale: float, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def diffusers_directory(tmp_path_factory) -> tuple[Path, WanPipeline]:
    """A tiny Wan written by diffusers' own WanPipeline.save_pretrained (no code of ours builds the components)."""
    preset = PRESETS["tiny"]
    torch.manual_seed(7)
    pipeline = WanPipeline(
        tokenizer=tiny_t5_tokenizer(),
        text_encoder=UMT5EncoderModel(UMT5Config(**preset.text_encoder)).eval(),
        vae=AutoencoderKLWan(**preset.vae).eval(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=WanTransformer3DModel(**preset.transformer).eval(),
    )
    directory = tmp_path_factory.mktemp("wan-diffusers")
    pipeline.save_pretrained(directory)
    return directory, pipeline


@torch.no_grad()  # as WanPipeline.__call__ runs it (with grad on, CPU attention may take another kernel)
def pipeline_text(pipeline: WanPipeline, prompts: list[str]) -> torch.Tensor:
    embeddings, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           max_sequence_length=TEXT_LENGTH, device=torch.device("cpu"))
    return embeddings


# --- presets and the flow-matching process ---------------------------------------------------------------------------
def test_tiny_builds_offline_with_the_wan_classes():
    model = tiny()
    assert isinstance(model.transformer, WanTransformer3DModel) and isinstance(model.vae, AutoencoderKLWan)
    scheduler = model.scheduler
    assert isinstance(scheduler, UniPCMultistepScheduler)
    assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
    assert scheduler.config.flow_shift == 3.0
    embeddings = model.encode_prompts(["a cat playing the piano", ""])
    assert embeddings.shape == (2, TEXT_LENGTH, TEXT_DIM)
    assert embeddings[1, 1:].eq(0).all() and embeddings[1, 0].abs().sum() > 0  # "" is </s>, then zeros
    assert sum(p.numel() for p in model.parameters()) < 150_000


@pytest.mark.parametrize(
    ("variant", "transformer", "layers", "heads", "ffn", "size", "shift"),
    [("1.3b", 1_418_996_800, 30, 12, 8960, (81, 480, 832), 3.0),
     ("14b", 14_288_491_584, 40, 40, 13824, (81, 720, 1280), 5.0)],
)
def test_full_size_presets_on_the_meta_device(variant, transformer, layers, heads, ffn, size, shift):
    """The released architectures: 128-d heads (1536 / 5120 wide), patch (1, 2, 2), 16 latent channels, VAE stride
    (4, 8, 8), umT5-XXL (4096-d, 512 tokens); nothing is allocated."""
    preset = PRESETS[variant]
    with torch.device("meta"):
        denoiser = WanTransformer3DModel.from_config(preset.transformer)
        vae = AutoencoderKLWan.from_config(preset.vae)
        text_encoder = UMT5EncoderModel(UMT5Config(**preset.text_encoder))
    assert sum(p.numel() for p in denoiser.parameters()) == transformer
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert sum(p.numel() for p in text_encoder.parameters()) == 5_680_910_336
    config = denoiser.config
    assert (config.num_layers, config.num_attention_heads, config.ffn_dim) == (layers, heads, ffn)
    assert config.num_attention_heads * config.attention_head_dim == heads * 128
    assert tuple(config.patch_size) == (1, 2, 2) and config.in_channels == vae.config.z_dim == 16
    assert (vae.config.scale_factor_temporal, vae.config.scale_factor_spatial) == (4, 8)
    assert (text_encoder.config.d_model, preset.text_length) == (4096, 512)
    assert preset.video_size == size and preset.scheduler["flow_shift"] == shift
    assert (preset.num_inference_steps, preset.guidance_scale) == (50, 5.0)


def test_flow_noising_and_velocity_target_match_the_hand_formula():
    model = tiny()
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 4, 3, 2, 2))
    t = np.array([0, 250, 731, 999])
    s = (t / 1000.0).reshape(-1, 1, 1, 1, 1)
    x0_t, eps_t, t_t = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
    np.testing.assert_allclose(model.add_noise(x0_t, eps_t, t_t).numpy(), (1 - s) * x0 + s * eps, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.training_target(x0_t, eps_t, t_t), eps_t - x0_t)
    assert torch.equal(model.noise_level(t_t), torch.tensor([0.0, 0.25, 0.731, 0.999]))
    assert torch.equal(model.add_noise(x0_t, eps_t, torch.tensor([0, 0, 0, 0])), x0_t)  # s = 0 is the clean latent


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform"])
def test_timesteps_follow_the_configured_density(scheme):
    model = tiny()
    model.timestep_sampling = FlowTimestepSampling(scheme=scheme)
    drawn = model.sample_timesteps(20_000, torch.Generator().manual_seed(0))
    u = compute_density_for_timestep_sampling(scheme, 20_000, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.int64 and torch.equal(drawn, (u * 1000).long())
    assert 0 <= drawn.min() and drawn.max() <= 999
    edges = ((drawn < 100) | (drawn >= 900)).float().mean().item()
    if scheme == "uniform":
        assert drawn.float().std().item() == pytest.approx(288.7, rel=0.02) and edges == pytest.approx(0.2, abs=0.01)
    else:  # sigmoid(N(0, 1)): mass in the middle, P(u < 0.1 or u > 0.9) = 2 Phi(-ln 9) = 0.028
        assert drawn.float().median().item() == pytest.approx(500, abs=10) and edges == pytest.approx(0.028, abs=0.005)


# --- loading parity --------------------------------------------------------------------------------------------------
def test_a_diffusers_directory_loads_with_identical_outputs(diffusers_directory):
    directory, pipeline = diffusers_directory
    model = build_model(TINY.model_copy(update={"path": str(directory)}), seed=123)
    assert model._prompt_encoder is None  # umT5 loads on first use only

    win, _, embeddings = pair_batch(model, num_pairs=2)
    timesteps = torch.tensor([37, 912])
    with torch.no_grad():
        expected = pipeline.transformer(hidden_states=win, timestep=timesteps, encoder_hidden_states=embeddings).sample
    torch.testing.assert_close(model.predict(win, timesteps, embeddings), expected, rtol=0, atol=1e-5)
    assert model._prompt_encoder is None  # predicting on precomputed embeddings never touched the text encoder

    clips = videos(2, seed=3)
    with torch.no_grad():
        pixels = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        z = pipeline.vae.encode(pixels).latent_dist.mean
    mean = torch.tensor(pipeline.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipeline.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = model.encode_videos(clips)
    torch.testing.assert_close(latents, (z - mean) / std, rtol=0, atol=1e-5)
    assert (latents - (z - mean)).abs().max() > 0.1  # the normalisation is really applied
    with torch.no_grad():
        frames = pipeline.vae.decode(latents * std + mean).sample
    decoded = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert (model.decode_latents(latents).int() - decoded.int()).abs().max() <= 1

    prompts = ["a red fox runs through snow", "  a   city &amp; rain "]
    assert torch.equal(model.encode_prompts(prompts), pipeline_text(pipeline, prompts))
    assert isinstance(model.scheduler, UniPCMultistepScheduler)


def _broken_copy(directory: Path, tmp_path: Path, component: str, edit) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(directory, copy)
    weights = copy / component / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights)
    return copy


def test_missing_and_unexpected_keys_are_listed(diffusers_directory, tmp_path):
    directory, _ = diffusers_directory

    def rename(state):
        state["proj_out.weight_renamed"] = state.pop("proj_out.weight")
        state.pop("blocks.1.attn2.to_k.bias")

    broken = _broken_copy(directory, tmp_path, "transformer", rename)
    pattern = (r"(?s)transformer: weights do not match WanTransformer3DModel\n  missing keys \(2\): "
               r"blocks\.1\.attn2\.to_k\.bias, proj_out\.weight\n  unexpected keys \(1\): proj_out\.weight_renamed$")
    with pytest.raises(CheckpointError, match=pattern):
        build_model(TINY.model_copy(update={"path": str(broken)}))


def test_missing_vae_key_is_listed(diffusers_directory, tmp_path):
    directory, _ = diffusers_directory
    broken = _broken_copy(directory, tmp_path, "vae", lambda state: state.pop("quant_conv.weight"))
    with pytest.raises(CheckpointError, match=r"vae: weights do not match AutoencoderKLWan\n  missing keys \(1\): "
                                              r"quant_conv\.weight$"):
        build_model(TINY.model_copy(update={"path": str(broken)}))


def test_wrong_variant_and_non_flow_schedulers_are_refused(diffusers_directory, tmp_path):
    directory, _ = diffusers_directory
    with pytest.raises(CheckpointError, match=r"variant='1\.3b'.*num_attention_heads = 2, variant '1\.3b' expects 12"):
        build_model(ModelConfig(family="wan", variant="1.3b", path=str(directory)))

    model = tiny()
    model.save_pretrained(tmp_path / "ddim")
    CogVideoXDDIMScheduler().save_pretrained(tmp_path / "ddim" / "scheduler")
    with pytest.raises(CheckpointError, match="scheduler 'CogVideoXDDIMScheduler' is not supported"):
        build_model(TINY.model_copy(update={"path": str(tmp_path / "ddim")}))
    UniPCMultistepScheduler().save_pretrained(tmp_path / "ddim" / "scheduler")  # epsilon UniPC: not a flow model
    with pytest.raises(CheckpointError, match="must be a flow-matching scheduler over 1000 steps"):
        build_model(TINY.model_copy(update={"path": str(tmp_path / "ddim")}))


def test_text_encoder_from_its_own_path_is_checked_on_first_use(diffusers_directory, tmp_path):
    directory, pipeline = diffusers_directory
    model = build_model(TINY.model_copy(update={"text_encoder_path": str(directory)}))
    assert model._prompt_encoder is None
    assert torch.equal(model.encode_prompts(["a cat"]), pipeline_text(pipeline, ["a cat"]))

    wrong = tmp_path / "wrong"
    UMT5EncoderModel(UMT5Config(**{**PRESETS["tiny"].text_encoder, "d_model": 16})).save_pretrained(
        wrong / "text_encoder")
    tiny_t5_tokenizer().save_pretrained(wrong / "tokenizer")
    with pytest.raises(CheckpointError, match="d_model = 16, variant 'tiny' expects 32"):
        build_model(TINY.model_copy(update={"text_encoder_path": str(wrong)})).encode_prompts(["a cat"])
    with pytest.raises(RuntimeError, match="no umT5 text encoder"):
        Wan.from_preset(dataclasses.replace(PRESETS["tiny"], offline_tokenizer=None), TINY).encode_prompts(["a"])


# --- Flow-DPO --------------------------------------------------------------------------------------------------------
def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand_flow_dpo(x0_win, x0_lose, eps, t, policy, reference, weights, beta, scaled):
    """Flow-DPO in float64 loops: x_s = (1 - s) x0 + s eps (s = t / 1000), v = eps - x0, one t and eps per pair;
    `policy` / `reference` map (x_s, t, pair index) to a velocity; beta constant or beta (1 - s)^2."""
    terms, insides = [], []
    for k in range(len(t)):
        s = t[k] / 1000.0
        errors = []
        for predict in (policy, reference):
            for x0 in (x0_win[k], x0_lose[k]):
                x_s = (1.0 - s) * x0 + s * eps[k]
                errors.append(float(np.mean((predict(x_s, t[k], k) - (eps[k] - x0)) ** 2)))
        model_win, model_lose, ref_win, ref_lose = errors
        pair_beta = beta * (1.0 - s) ** 2 if scaled else beta
        inside = -0.5 * pair_beta * ((model_win - model_lose) - (ref_win - ref_lose))
        insides.append(inside)
        terms.append(-weights[k] * _logsigmoid(inside))
    return sum(terms) / len(t), insides


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("beta_schedule", ["constant", "timestep_scaled"])
def test_flow_dpo_step_equals_the_float64_reference(beta_schedule, finetune):
    model = tiny(finetune=finetune, lora=LoraConfig(rank=4))
    perturb(model, 0.02 if finetune == "full" else 0.2)
    win, lose, text = pair_batch(model)
    weights = [0.5, 1.0, 2.0]
    out = dpo_step(model, win, lose, text, torch.tensor(weights), beta_dpo=100.0,
                   generator=torch.Generator().manual_seed(3), beta_schedule=beta_schedule)

    generator = torch.Generator().manual_seed(3)  # the same draws dpo_step makes: t per pair, then eps
    t = model.sample_timesteps(3, generator).numpy()
    eps = torch.randn(win.shape, generator=generator).double().numpy()

    def velocity(reference: bool):
        def predict(x_s, timestep, k):
            x = torch.from_numpy(x_s).float()[None]
            with torch.no_grad():
                v = model.predict(x, torch.tensor([int(timestep)]), text[k : k + 1], reference=reference)
            return v[0].double().numpy()
        return predict

    expected, insides = hand_flow_dpo(win.double().numpy(), lose.double().numpy(), eps, t, velocity(False),
                                      velocity(True), weights, 100.0, beta_schedule == "timestep_scaled")
    assert all(0.01 < abs(x) < 10 for x in insides)  # neither trivial nor saturated
    assert out.loss.item() == pytest.approx(expected, abs=2e-5)
    assert float(out.metrics["reward_margin"]) == pytest.approx(sum(insides) / 3, abs=2e-5)
    assert float(out.metrics["implicit_accuracy"]) == pytest.approx(sum(x > 0 for x in insides) / 3)
    assert float(out.metrics["timestep"]) == pytest.approx(t.mean())


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("beta_schedule", ["constant", "timestep_scaled"])
def test_flow_dpo_loss_is_ln2_times_mean_weight_at_init(beta_schedule, finetune):
    model = tiny(finetune=finetune, lora=LoraConfig(rank=4))
    win, lose, text = pair_batch(model)
    out = dpo_step(model, win, lose, text, torch.tensor([0.5, 2.5, 1.0]), beta_dpo=100.0,
                   generator=torch.Generator().manual_seed(0), beta_schedule=beta_schedule)
    assert out.loss.item() == pytest.approx(math.log(2) * 4.0 / 3.0, rel=1e-6)
    assert float(out.metrics["reward_margin"]) == 0.0


@pytest.mark.parametrize("beta_schedule", ["constant", "timestep_scaled"])
def test_a_gradient_step_prefers_the_winner(beta_schedule):
    """Descending the Flow-DPO loss lowers the policy's winner v-error relative to its loser v-error."""
    model = tiny(finetune="full")
    win, lose, text = pair_batch(model, num_pairs=2)

    def step():
        return dpo_step(model, win, lose, text, None, beta_dpo=100.0, generator=torch.Generator().manual_seed(5),
                        beta_schedule=beta_schedule)

    before = step()
    before.loss.backward()
    gradients = [p.grad for p in model.trainable_parameters()]
    assert any(g.abs().sum() > 0 for g in gradients)
    torch.optim.SGD(model.trainable_parameters(), lr=0.05).step()
    with torch.no_grad():
        after = step()
    margin = float(after.metrics["model_mse_win"]) - float(after.metrics["model_mse_lose"])
    margin_before = float(before.metrics["model_mse_win"]) - float(before.metrics["model_mse_lose"])
    assert margin < margin_before
    assert after.loss.item() < before.loss.item() and float(after.metrics["reward_margin"]) > 0
    assert float(after.metrics["ref_mse_win"]) == float(before.metrics["ref_mse_win"])  # the reference stays


def test_timestep_scaled_beta_needs_shared_noise():
    model = tiny()
    win, lose, text = pair_batch(model)
    with pytest.raises(ConfigError, match="needs dpo.shared_noise=true"):
        dpo_step(model, win, lose, text, None, beta_dpo=100.0, generator=torch.Generator().manual_seed(0),
                 shared_noise=False, beta_schedule="timestep_scaled")


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_dpo_step_updates_only_the_policy(finetune, check_dpo_step):
    model = tiny(finetune=finetune, lora=LoraConfig(rank=4))
    win, lose, text = pair_batch(model, num_pairs=1)
    check_dpo_step(model, win, lose, text)
    assert model._prompt_encoder is not None  # the tiny preset's random umT5 (no directory to load from)


def test_gradient_checkpointing_gives_the_same_gradients():
    gradients = []
    for checkpointing in (False, True):
        model = tiny(gradient_checkpointing=checkpointing)
        perturb(model, 0.02)
        win, lose, text = pair_batch(model)
        out = dpo_step(model, win, lose, text, None, beta_dpo=100.0, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        gradients.append([p.grad.clone() for p in model.trainable_parameters()])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain)


def test_bf16_reference_keeps_the_diffusers_fp32_modules():
    model = tiny(mixed_precision="bf16")
    reference, policy = model.reference_denoiser, model.transformer
    assert reference.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert policy.blocks[0].attn1.to_q.weight.dtype == torch.float32
    kept = dict(reference.named_parameters()) | dict(reference.named_buffers())
    originals = dict(policy.named_parameters()) | dict(policy.named_buffers())
    for name in ("rope.freqs_cos", "scale_shift_table", "blocks.1.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight"):
        assert kept[name].dtype == torch.float32 and torch.equal(kept[name], originals[name]), name
        assert kept[name].data_ptr() != originals[name].data_ptr(), name  # a copy: training leaves it alone
    win, lose, text = pair_batch(model)
    out = dpo_step(model, win, lose, text, None, beta_dpo=100.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.trainable_parameters())


# --- sampling --------------------------------------------------------------------------------------------------------
def test_same_seed_same_video():
    model = tiny()
    settings = dict(num_frames=5, height=16, width=32, num_inference_steps=3)
    first = model.sample(["a cat", "a dog"], [1, 2], **settings)
    assert first.shape == (2, 5, 16, 32, 3) and first.dtype == torch.uint8
    assert torch.equal(first, model.sample(["a cat", "a dog"], [1, 2], **settings))
    other = model.sample(["a cat", "a dog"], [1, 3], **settings)
    assert torch.equal(other[0], first[0]) and not torch.equal(other[1], first[1])


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sampling_matches_the_wan_pipeline(diffusers_directory, tmp_path, scheduler):
    """Same components, seed and steps: our UniPC (or the directory's Euler) + CFG loop equals WanPipeline's."""
    directory, pipeline = diffusers_directory
    if scheduler == "euler":
        shutil.copytree(directory, tmp_path / "euler")
        FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(tmp_path / "euler" / "scheduler")
        directory = tmp_path / "euler"
    model = build_model(TINY.model_copy(update={"path": str(directory)}))
    sampler = type(model.scheduler)
    assert sampler is (UniPCMultistepScheduler if scheduler == "unipc" else FlowMatchEulerDiscreteScheduler)
    prompts, seeds, size = ["a red car", "a blue boat"], [11, 12], dict(num_frames=5, height=32, width=16)
    noise, generators = model.seeded_noise(seeds, model.latent_shape(**size))
    ours = model.denoise(noise, model.encode_prompts(prompts), generators, num_inference_steps=4, guidance_scale=5.0)

    reference = WanPipeline(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, vae=pipeline.vae,
                            transformer=pipeline.transformer,
                            scheduler=sampler.from_config(model.scheduler.config))
    reference.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    common = dict(prompt=prompts, num_inference_steps=4, guidance_scale=5.0, max_sequence_length=TEXT_LENGTH, **size)
    theirs = reference(generator=generators, output_type="latent", **common).frames
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)

    videos_ours = model.sample(prompts, seeds, num_inference_steps=4, guidance_scale=5.0, **size)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    frames = reference(generator=generators, output_type="pt", **common).frames  # (B, T, 3, H, W) in [0, 1]
    videos_theirs = (frames * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    assert (videos_ours.int() - videos_theirs.int()).abs().max() <= 1


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_clearly():
    model = tiny()
    with pytest.raises(ValueError, match=r"1 \+ k\*4 frames"):
        model.encode_videos(videos(1, seed=0, frames=8))
    with pytest.raises(ValueError, match="divisible by 16"):
        model.encode_videos(videos(1, seed=0, height=24))
    win, _, text = pair_batch(model, num_pairs=2)
    with pytest.raises(ValueError, match=r"text embeddings \(B, 16, 32\)"):
        model.predict(win, torch.tensor([1, 2]), text[:, :8])
    with pytest.raises(ValueError, match=r"latents \(B, 4, F, H, W\)"):
        model.predict(win[:, :3], torch.tensor([1, 2]), text)
    with pytest.raises(ValueError, match=r"latents \(B, 4, F, H, W\)"):
        model.decode_latents(win[:, :3])
    with pytest.raises(ConfigError, match="finetune='temporal': wan has no temporal layers"):
        tiny(finetune="temporal")
