"""VideoCrafter2 behind the VideoDiffusionModel interface: DPO step per finetune mode, checkpointing, sampling, I/O."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from videodpo_ray.errors import CheckpointError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.models.vc2 import VideoCrafter2
from videodpo_ray.training.step import dpo_step

pytestmark = pytest.mark.usefixtures("single_torch_thread")
LATENT_SHAPE = (2, 4, 3, 8, 8)  # 2 pairs, 4 channels, 3 frames, 8 x 8


def tiny(**overrides) -> VideoCrafter2:
    torch.manual_seed(0)
    return VideoCrafter2.tiny(ModelConfig(family="vc2", **overrides))


def pair_batch(model: VideoCrafter2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    win, lose = torch.randn(LATENT_SHAPE, generator=generator), torch.randn(LATENT_SHAPE, generator=generator)
    return win, lose, model.encode_prompts(["a red fox in snow", "a city at night"])


@pytest.mark.parametrize("finetune", ["full", "lora", "temporal"])
def test_dpo_step_changes_only_trainable_parameters(finetune: str, check_dpo_step):
    model = tiny(finetune=finetune)
    names = {name for name, p in model.unet.named_parameters() if p.requires_grad}
    if finetune == "lora":
        assert names and all(".lora_" in name for name in names) and model.reference_denoiser is None
        atol = 0.0  # the reference is the same UNet with adapters off (B = 0): exactly equal at step 0
    else:
        reference = model.reference_denoiser
        assert reference is not None and not any(p.requires_grad for p in reference.parameters())
        atol = 1e-3
    if finetune == "temporal":
        assert all(("temp_" in name or name.startswith("transformer_in.")) for name in names)
        assert any(name.startswith("transformer_in.") for name in names) and len(names) < len(
            list(model.unet.parameters())
        )
    win, lose, text = pair_batch(model)
    check_dpo_step(model, win, lose, text, ln2_atol=atol)


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    def gradients(model: VideoCrafter2) -> list[torch.Tensor]:
        win, lose, text = pair_batch(model)
        out = dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    plain = gradients(tiny(finetune="full"))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    checkpointed = gradients(tiny(finetune="full", gradient_checkpointing=True))
    assert len(calls) == 6  # one policy forward: transformer_in, 2 down, mid, 2 up blocks (reference: no grad)
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sampling_is_deterministic_per_seed():
    model = tiny(finetune="lora")
    first = model.sample(["a cat", "a dog"], [1, 2], num_inference_steps=2)
    assert first.shape == (2, 4, 16, 16, 3) and first.dtype == torch.uint8
    assert torch.equal(first, model.sample(["a cat", "a dog"], [1, 2], num_inference_steps=2))
    other = model.sample(["a cat"], [7], num_inference_steps=2)
    assert not torch.equal(first[0], other[0])
    alone = model.sample(["a dog"], [2], num_inference_steps=2)  # video i depends only on (prompt i, seed i)
    assert (alone[0].int() - first[1].int()).abs().max() <= 1


def test_ddim_grid_is_lvdms_and_any_step_count_samples():
    from videodpo_ray.models.vc2_schedule import VC2NoiseSchedule

    schedule = VC2NoiseSchedule()
    assert schedule.ddim_timesteps(50) == list(range(1, 1000, 20))  # lvdm: 1, 21, ..., 981
    assert schedule.ddim_timesteps(3) == [1, 334, 667]  # lvdm's grid would be 1, 334, 667, 1000: out of range
    # every point of lvdm's grid: it starts near 1000 (cutting it to num_steps points would start at 853 for 7)
    assert schedule.ddim_timesteps(7) == [1, 143, 285, 427, 569, 711, 853, 995]
    assert [schedule.ddim_timesteps(n)[-1] for n in (25, 30, 60, 999, 1000)] == [961, 991, 993, 999, 999]
    video = tiny().sample(["a cat"], [1], num_inference_steps=3)
    assert video.shape == (1, 4, 16, 16, 3)


@pytest.mark.parametrize("num_steps", [50, 7])
def test_ddim_sampling_is_lvdms_sampler_step_for_step(num_steps: int):
    """An independent port of lvdm's DDIMSampler (make_ddim_timesteps "uniform", eta 1, scale_arr divided out of
    pred_x0 and the previous step's multiplied in, alphas_prev[0] = abar[0]) on a fixed linear noise predictor."""
    from videodpo_ray.models.vc2_schedule import VC2NoiseSchedule

    schedule = VC2NoiseSchedule()
    weight = 0.1 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def predict_noise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,bj...->bi...", weight, x) * (1 + t.float().view(-1, 1, 1, 1, 1) / 1000)

    start = torch.randn(2, 4, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    ours = schedule.ddim_sample(predict_noise, start.clone(), num_steps, 1.0,
                                [torch.Generator().manual_seed(seed) for seed in (1, 2)])

    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2).astype(np.float32)
    scale = np.concatenate([np.linspace(1.0, 0.7, 400), np.full(600, 0.7)]).astype(np.float32)
    steps = np.asarray(list(range(0, 1000, 1000 // num_steps))) + 1
    alphas, alphas_prev = abar[steps], np.asarray([abar[0], *abar[steps[:-1]]])
    sigmas = np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    scales, scales_prev = scale[steps], np.asarray([scale[0], *scale[steps[:-1]]])
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    x = start.clone()
    for index in reversed(range(len(steps))):
        eps = predict_noise(x, torch.full((2,), int(steps[index]), dtype=torch.long))
        a_t, a_prev, sigma = float(alphas[index]), float(alphas_prev[index]), float(sigmas[index])
        pred_x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t) / float(scales[index])
        noise = sigma * torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])
        x = np.sqrt(a_prev) * float(scales_prev[index]) * pred_x0 + np.sqrt(1 - a_prev - sigma**2) * eps + noise
    torch.testing.assert_close(ours, x.float(), rtol=1e-4, atol=1e-4)


def test_videos_are_encoded_frame_by_frame_and_decoded_to_uint8():
    model = tiny()
    videos = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8)
    latents = model.encode_videos(videos)
    assert latents.shape == (2, 4, 3, 8, 8)
    frame = videos[:, 1].permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        expected = model.vae.encode(frame).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents[:, :, 1], expected)
    sampled = model.encode_videos(videos, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, latents)
    decoded = model.decode_latents(latents)
    assert decoded.shape == videos.shape and decoded.dtype == torch.uint8


def test_noising_and_target_follow_vc2_scale_arr():
    model = tiny()
    x0, noise = torch.randn(LATENT_SHAPE), torch.randn(LATENT_SHAPE)
    t = torch.tensor([10, 700])
    abar = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    scale = torch.tensor([1.0 - 0.3 * 10 / 399, 0.7]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(model.add_noise(x0, noise, t), abar.sqrt() * x0 * scale + (1 - abar).sqrt() * noise)
    assert torch.equal(model.training_target(x0, noise, t), noise)
    steps = model.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert steps.dtype == torch.int64 and steps.min() >= 0 and steps.max() <= 999 and len(steps.unique()) > 500


def test_trainable_state_dict_round_trip_is_strict():
    model = tiny(finetune="lora")
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.normal_()
    state = model.trainable_state_dict()
    assert set(state) == {name for name, p in model.unet.named_parameters() if ".lora_" in name}
    fresh = tiny(finetune="lora")
    fresh.load_trainable_state_dict(state)
    win, lose, text = pair_batch(model)
    t = torch.tensor([100, 900])
    with torch.no_grad():
        assert torch.equal(model.predict(win, t, text), fresh.predict(win, t, text))
    first = next(iter(state))
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {re.escape(first)}"):
        fresh.load_trainable_state_dict({k: v for k, v in list(state.items())[1:]})
    with pytest.raises(CheckpointError, match=rf"shape mismatches.*{re.escape(first)} \(1,\)"):
        fresh.load_trainable_state_dict(state | {first: torch.zeros(1)})


def test_bf16_mode_keeps_a_bf16_reference_copy():
    model = tiny(finetune="full", mixed_precision="bf16")
    assert model.reference_denoiser.dtype == torch.bfloat16 and model.unet.dtype == torch.float32
    win, _, text = pair_batch(model)
    t = torch.tensor([100, 900])
    with torch.no_grad():
        policy, reference = model.predict(win, t, text), model.predict(win, t, text, reference=True)
    assert policy.dtype == reference.dtype == torch.float32
    assert (policy - reference).abs().max() < 0.1


def test_build_model_and_from_config(vc2_tiny_dir: Path):
    model = build_model(ModelConfig(family="vc2", variant="tiny", finetune="lora"))
    assert isinstance(model, VideoCrafter2) and model.text_encoder is not None
    loaded = VideoCrafter2.from_config(ModelConfig(family="vc2", path=str(vc2_tiny_dir / "model.ckpt")))
    assert loaded.unet.config.block_out_channels == (32, 64, 64)
    with pytest.raises(RuntimeError, match="text_encoder_path"):
        loaded.encode_prompts(["a cat"])
    win = torch.randn(1, 4, 2, 8, 8)
    out = dpo_step(
        loaded,
        win,
        win.flip(-1),
        torch.randn(1, 7, 32),
        None,
        beta_dpo=5000.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert math.isclose(out.loss.item(), math.log(2), abs_tol=1e-3)


def test_sampler_defaults_are_the_official_scripts():
    """models.md: VC2 samples with DDIM 50 steps, eta 1.0, CFG 12 on the empty prompt, fps 28; T2V-Turbo v1 with 4
    LCM steps, w 7.5, fps 16 (which VideoDPO also trains VC2 at)."""
    from videodpo_ray.models.t2v_turbo import T2VTurbo

    vc2 = (VideoCrafter2.default_num_inference_steps, VideoCrafter2.ddim_eta, VideoCrafter2.default_guidance_scale,
           VideoCrafter2.sample_fps)
    assert vc2 == (50, 1.0, 12.0, 28)
    turbo = (T2VTurbo.default_num_inference_steps, T2VTurbo.default_guidance_scale, T2VTurbo.sample_fps)
    assert turbo == (4, 7.5, 16)
    assert ModelConfig(family="vc2").fps == 16
