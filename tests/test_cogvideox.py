"""CogVideoX behind the VideoDiffusionModel interface: tiny random models on the CPU, real diffusers classes."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from videodpo_ray.errors import CheckpointError, ConfigError
from videodpo_ray.models import LoraConfig, ModelConfig, build_model
from videodpo_ray.models.cogvideox import PRESETS, CogVideoX
from videodpo_ray.training.step import dpo_step

TINY = ModelConfig(family="cogvideox", variant="tiny")


def tiny(seed: int = 0, **overrides) -> CogVideoX:
    torch.manual_seed(seed)
    return CogVideoX.tiny(TINY.model_copy(update=overrides))


def training_batch(model: CogVideoX, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((batch, *model.latent_shape(9, 16, 16)), generator=generator)
    embeddings = torch.randn((batch, 16, 32), generator=generator)
    return latents, embeddings


def hand_alphas_cumprod(snr_shift_scale: float) -> np.ndarray:
    """scaled_linear betas -> cumprod -> SNR shift -> zero-terminal-SNR rescale, in float64 numpy."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    abar = abar / (snr_shift_scale + (1.0 - snr_shift_scale) * abar)  # SNR divided by the shift scale
    root = np.sqrt(abar)
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return root**2


def test_tiny_builds_offline_with_the_cogvideox_classes():
    model = build_model(TINY)
    assert isinstance(model, CogVideoX)
    assert isinstance(model.transformer, CogVideoXTransformer3DModel)
    assert isinstance(model.vae, AutoencoderKLCogVideoX)
    assert isinstance(model.scheduler, CogVideoXDDIMScheduler)
    assert model.prediction_type == "v_prediction"
    schedule = model.scheduler.config
    assert (schedule.prediction_type, schedule.timestep_spacing) == ("v_prediction", "trailing")
    assert schedule.snr_shift_scale == 3.0
    assert schedule.rescale_betas_zero_snr
    embeddings = model.encode_prompts(["a cat playing the piano", ""])
    assert embeddings.shape == (2, 16, 32)
    assert not torch.equal(embeddings[0], embeddings[1])
    assert sum(p.numel() for p in model.parameters()) < 200_000


@pytest.mark.parametrize(
    ("variant", "transformer", "scaling", "rope", "shift"),
    [("2b", 1_693_783_872, 1.15258426, False, 3.0), ("5b", 5_570_283_072, 0.7, True, 1.0)],
)
def test_full_size_presets_on_the_meta_device(variant, transformer, scaling, rope, shift):
    """The 2B/5B configs give the released sizes (2 bytes/param: 3.4 GB and 11.1 GB transformers, 0.43 GB VAE,
    9.5 GB T5-XXL) without allocating anything."""
    preset = PRESETS[variant]
    with torch.device("meta"):
        denoiser = CogVideoXTransformer3DModel.from_config(preset.transformer)
        vae = AutoencoderKLCogVideoX.from_config(preset.vae)
        text_encoder = T5EncoderModel(T5Config(**preset.text_encoder))
    assert sum(p.numel() for p in denoiser.parameters()) == transformer
    assert sum(p.numel() for p in vae.parameters()) == 215_583_907
    assert sum(p.numel() for p in text_encoder.parameters()) == 4_762_310_656
    assert denoiser.config.use_rotary_positional_embeddings is rope
    assert vae.config.scaling_factor == scaling
    assert preset.scheduler["snr_shift_scale"] == shift
    assert denoiser.config.max_text_seq_length == 226


@pytest.mark.parametrize("variant", ["tiny", "5b"])
def test_noising_and_velocity_target_match_the_hand_formula(variant):
    model = tiny()
    if variant != "tiny":  # same model, the 5B noise schedule (SNR shift 1.0)
        model.scheduler = CogVideoXDDIMScheduler.from_config(PRESETS[variant].scheduler)
    abar = hand_alphas_cumprod(PRESETS[variant].scheduler["snr_shift_scale"])
    np.testing.assert_allclose(model.scheduler.alphas_cumprod.numpy(), abar, rtol=1e-12, atol=1e-15)
    assert abar[-1] == 0.0  # zero terminal SNR: t = 999 is pure noise

    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn((4, 3, 4, 2, 2), generator=generator)
    noise = torch.randn((4, 3, 4, 2, 2), generator=generator)
    timesteps = torch.tensor([0, 250, 731, 999])
    a = torch.from_numpy(abar)[timesteps].float().view(4, 1, 1, 1, 1)
    torch.testing.assert_close(model.training_target(x0, noise, timesteps), a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(model.add_noise(x0, noise, timesteps), a.sqrt() * x0 + (1 - a).sqrt() * noise)

    drawn = model.sample_timesteps(4096, torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.int64 and drawn.min() >= 0 and drawn.max() <= 999
    assert drawn.float().std() > 250  # uniform over 0..999 (std 288.7)


def test_two_step_sample_is_deterministic_per_seed():
    model = tiny()
    settings = dict(num_frames=9, height=16, width=16, num_inference_steps=2)
    videos = model.sample(["a cat", "a dog"], [1, 2], **settings)
    assert videos.shape == (2, 9, 16, 16, 3) and videos.dtype == torch.uint8
    assert torch.equal(videos, model.sample(["a cat", "a dog"], [1, 2], **settings))
    other = model.sample(["a cat", "a dog"], [1, 3], **settings)
    assert torch.equal(other[0], videos[0])
    assert not torch.equal(other[1], videos[1])


@pytest.mark.parametrize("rope", [False, True])
def test_denoise_matches_the_diffusers_cogvideox_pipeline(rope):
    """Our DDIM + CFG loop (and, for the 5B-style transformer, our RoPE grid) equals CogVideoXPipeline's."""
    preset = PRESETS["tiny"]
    if rope:
        # RoPE splits a head into t/h/w parts: the head dim must be a multiple of 16 (64 in the 5B)
        transformer = {
            **preset.transformer,
            "use_rotary_positional_embeddings": True,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "sample_height": 4,
            "sample_width": 6,
        }
        preset = dataclasses.replace(preset, transformer=transformer)
    torch.manual_seed(0)
    model = CogVideoX.from_preset(preset, TINY)
    noise, generators = model.seeded_noise([7], model.latent_shape(num_frames=9, height=32, width=48))
    embeddings = model.encode_prompts(["a red car"])
    ours = model.denoise(noise, embeddings, generators, num_inference_steps=3, guidance_scale=6.0)

    pipeline = CogVideoXPipeline(
        tokenizer=model.prompt_encoder.tokenizer,
        text_encoder=model.prompt_encoder.encoder,
        vae=model.vae,
        transformer=model.transformer,
        scheduler=CogVideoXDDIMScheduler.from_config(model.scheduler.config),
    )
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        prompt_embeds=embeddings,
        negative_prompt_embeds=model.empty_prompt_embedding(),
        latents=noise.clone(),
        num_frames=9,
        height=32,
        width=48,
        num_inference_steps=3,
        guidance_scale=6.0,
        output_type="latent",
    ).frames
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    if rope:  # the RoPE is really used: without it the transformer gives something else
        timestep = torch.tensor([500])
        no_rope = model.transformer(noise, embeddings, timestep, return_dict=False)[0]
        assert not torch.allclose(model.predict(noise, timestep, embeddings), no_rope)


def test_lora_reference_is_the_base_model_and_only_lora_trains():
    base = tiny(seed=0)
    model = tiny(seed=0, finetune="lora", lora=LoraConfig(rank=4))
    trainable = dict(model.transformer.named_parameters())
    names = [name for name, p in trainable.items() if p.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert len(names) == 2 * 4  # lora_A + lora_B on to_q, to_k, to_v, to_out.0 of the one block
    assert {id(p) for p in model.trainable_parameters()} == {id(trainable[name]) for name in names}
    assert model.reference_denoiser is None

    with torch.no_grad():  # make the LoRA non-trivial (init has lora_B = 0)
        for name in names:
            trainable[name].normal_(std=0.5)
    latents, embeddings = training_batch(model)
    timesteps = torch.tensor([100, 800])
    noisy = model.add_noise(latents, torch.randn_like(latents), timesteps)
    expected = base.predict(noisy, timesteps, embeddings)
    assert torch.equal(model.predict(noisy, timesteps, embeddings, reference=True), expected)
    policy = model.predict(noisy, timesteps, embeddings)
    assert not torch.allclose(policy, expected)
    assert all(trainable[name].requires_grad for name in names)  # adapters back on, still trainable

    policy.square().mean().backward()
    assert all(p.grad is None for name, p in trainable.items() if name not in names)
    assert all(trainable[name].grad is not None for name in names)

    state = model.trainable_state_dict()
    assert sorted(state) == sorted(names)
    fresh = tiny(seed=0, finetune="lora", lora=LoraConfig(rank=4))  # same base, LoRA at init
    fresh.load_trainable_state_dict(state)
    assert torch.equal(fresh.predict(noisy, timesteps, embeddings), policy.detach())
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\).*unexpected keys \(1\): bogus"):
        fresh.load_trainable_state_dict(dict(list(state.items())[1:], bogus=torch.zeros(1)))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_finetune_dpo_step_updates_only_the_policy(checkpointing):
    model = tiny(seed=0, gradient_checkpointing=checkpointing)
    assert model.reference_denoiser is not None
    reference_before = {k: v.clone() for k, v in model.reference_denoiser.state_dict().items()}
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    policy_before = {k: v.clone() for k, v in model.transformer.named_parameters()}
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.transformer.parameters()}

    win, embeddings = training_batch(model, seed=1)
    lose, _ = training_batch(model, seed=2)
    output = dpo_step(model, win, lose, embeddings, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
    assert output.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    model.zero_grad()
    output.loss.backward()
    gradients = [p.grad for p in model.transformer.parameters()]
    assert all(g is not None for g in gradients) and any(g.abs().sum() > 0 for g in gradients)
    assert all(p.grad is None for p in model.reference_denoiser.parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    torch.optim.SGD(model.trainable_parameters(), lr=1.0).step()

    for name, value in model.reference_denoiser.state_dict().items():
        assert torch.equal(value, reference_before[name]), name
    for name, value in model.vae.state_dict().items():
        assert torch.equal(value, vae_before[name]), name
    assert any(not torch.equal(p, policy_before[name]) for name, p in model.transformer.named_parameters())
    after = dpo_step(model, win, lose, embeddings, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
    assert after.loss.item() != pytest.approx(math.log(2), abs=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny(seed=0, gradient_checkpointing=checkpointing)
        win, embeddings = training_batch(model, seed=1)
        lose, _ = training_batch(model, seed=2)
        with torch.no_grad():  # move the policy off the reference so the DPO gradient is not tiny
            for p in model.transformer.parameters():
                p.add_(0.01 * torch.randn_like(p))
        loss = dpo_step(
            model, win, lose, embeddings, None, beta_dpo=500.0, generator=torch.Generator().manual_seed(0)
        ).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.transformer.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_bf16_autocast_and_bf16_reference():
    model = tiny(seed=0, mixed_precision="bf16")
    assert next(model.reference_denoiser.parameters()).dtype == torch.bfloat16
    assert next(model.transformer.parameters()).dtype == torch.float32
    win, embeddings = training_batch(model, seed=1)
    lose, _ = training_batch(model, seed=2)
    output = dpo_step(model, win, lose, embeddings, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    timesteps = torch.tensor([10, 500])
    prediction = model.predict(model.add_noise(win, torch.randn_like(win), timesteps), timesteps, embeddings)
    assert prediction.dtype == torch.float32


def _saved_tiny(directory) -> CogVideoX:
    model = tiny(seed=0)
    model.save_pretrained(directory)
    return model


def _same_model(loaded: CogVideoX, original: CogVideoX) -> None:
    latents, embeddings = training_batch(original)
    timesteps = torch.tensor([3, 900])
    assert torch.equal(loaded.predict(latents, timesteps, embeddings), original.predict(latents, timesteps, embeddings))
    prompts = ["a cat", "sunset over the ocean"]
    assert torch.equal(loaded.encode_prompts(prompts), original.encode_prompts(prompts))
    for name, value in original.vae.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[name], value), name


def test_save_and_strict_load_round_trip(tmp_path):
    original = _saved_tiny(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"transformer", "vae", "scheduler", "text_encoder", "tokenizer"}
    loaded = build_model(TINY.model_copy(update={"path": str(tmp_path)}))
    assert loaded._prompt_encoder is None  # the T5 loads on first use only
    _same_model(loaded, original)


def test_strict_load_names_a_bad_or_missing_key(tmp_path):
    _saved_tiny(tmp_path)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out.weight_renamed"] = state.pop("proj_out.weight")
    save_file(state, weights)
    config = TINY.model_copy(update={"path": str(tmp_path)})
    bad_key = (
        r"(?s)transformer.*missing keys \(1\): proj_out\.weight\n.*unexpected keys \(1\): proj_out\.weight_renamed"
    )
    with pytest.raises(CheckpointError, match=bad_key):
        build_model(config)

    state.pop("proj_out.weight_renamed")
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): proj_out\.weight$"):
        build_model(config)


def test_load_rejects_a_checkpoint_of_another_variant(tmp_path):
    _saved_tiny(tmp_path)
    with pytest.raises(CheckpointError, match=r"variant='2b'.*num_attention_heads = 4, variant '2b' expects 30"):
        build_model(ModelConfig(family="cogvideox", variant="2b", path=str(tmp_path)))


def test_load_from_object_storage_through_the_cache(tmp_path, monkeypatch, s3_bucket):
    import fsspec

    original = _saved_tiny(tmp_path / "local")
    url = f"{s3_bucket}/cogvideox-tiny"
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "local") + "/", url.removeprefix("s3://"), recursive=True)
    monkeypatch.setenv("VIDEODPO_RAY_CACHE", str(tmp_path / "cache"))
    loaded = build_model(TINY.model_copy(update={"path": url}))
    _same_model(loaded, original)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "transformer" / "config.json").is_file()
    _same_model(build_model(TINY.model_copy(update={"path": url})), original)  # from the cache: nothing new
    assert list((tmp_path / "cache").iterdir()) == cached
    fs.rm(url.removeprefix("s3://"), recursive=True)  # gone from storage: not served from a stale cache
    with pytest.raises(CheckpointError, match=f"{url}: no files found"):
        build_model(TINY.model_copy(update={"path": url}))


def test_t5_from_a_sentencepiece_tokenizer_directory(tmp_path):
    """The released layout: tokenizer/spiece.model + text_encoder/ weights, loaded via text_encoder_path."""
    import sentencepiece

    corpus = ["a cat playing the piano", "a dog running on the beach", "sunset over the ocean"] * 10
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model_file,
        vocab_size=25,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(model_file.getvalue())
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(**PRESETS["tiny"].text_encoder)).eval()
    encoder.save_pretrained(tmp_path / "text_encoder")

    model = build_model(TINY.model_copy(update={"text_encoder_path": str(tmp_path)}))
    prompts = ["a cat on the beach", ""]
    ids = T5Tokenizer.from_pretrained(str(tmp_path / "tokenizer"))(
        prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids[1, 0] == 1 and ids[1, 1:].eq(0).all()  # "" -> </s> then padding, no attention mask
    with torch.no_grad():
        expected = encoder(ids)[0]
    torch.testing.assert_close(model.encode_prompts(prompts), expected, rtol=0, atol=0)

    wrong = T5Config(**{**PRESETS["tiny"].text_encoder, "d_model": 16, "d_kv": 4})
    T5EncoderModel(wrong).save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match="d_model = 16"):
        build_model(TINY.model_copy(update={"text_encoder_path": str(tmp_path)})).encode_prompts(["a cat"])


def test_encode_decode_shapes():
    model = tiny()
    videos = torch.randint(0, 256, (2, 9, 16, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    latents = model.encode_videos(videos)
    assert latents.shape == (2, 3, 4, 2, 4)  # [B, F, C, H, W]: 9 frames -> 3, 8x spatial
    assert torch.equal(latents, model.encode_videos(videos))  # posterior mean
    sampled = model.encode_videos(videos, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    decoded = model.decode_latents(latents)
    assert decoded.shape == (2, 9, 16, 32, 3) and decoded.dtype == torch.uint8
    with pytest.raises(ValueError, match="1 \\+ k\\*8 frames"):
        model.encode_videos(videos[:, :5])
    with pytest.raises(ValueError, match="odd F"):
        model.decode_latents(latents[:, :2])
    with pytest.raises(ValueError, match="divisible by 16"):
        model.encode_videos(videos[:, :, :, :24])


def test_bad_configs_fail_clearly():
    with pytest.raises(ConfigError, match="model.variant='full'"):
        build_model(ModelConfig(family="cogvideox", variant="full"))
    with pytest.raises(ConfigError, match="finetune='temporal': cogvideox has no temporal layers"):
        tiny(finetune="temporal")
    model = CogVideoX.from_preset(dataclasses.replace(PRESETS["tiny"], offline_tokenizer=None), TINY)
    with pytest.raises(RuntimeError, match="no T5 text encoder"):
        model.encode_prompts(["a cat"])
    latents, embeddings = training_batch(model)
    with pytest.raises(ValueError, match=r"text embeddings \(B, 16, 32\)"):
        model.predict(latents, torch.tensor([1, 2]), embeddings[:, :8])
