"""Every registered model family passes the same checks, unchanged: tiny preset, random init, CPU.

The family list comes from the registry (`videodpo_ray.models.families()`), so a family added later is picked up
here automatically: the LoRA adapters-off reference is exactly the base model, trainable weights are copies that
round-trip (directly and through the training export) and load strictly, presets are listed by name, and a
`save_pretrained` directory loads the same from a local path and from an s3:// URL.
"""

from __future__ import annotations

import re
from pathlib import Path

import fsspec
import pytest
import torch

from videodpo_ray.config import build_config
from videodpo_ray.errors import CheckpointError, ConfigError
from videodpo_ray.models import FAMILIES, ModelConfig, build_model, families, model_class
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.models.functional import (
    classifier_free_guidance,
    guidance_embeddings,
    pixels_to_vae_input,
    vae_output_to_pixels,
)
from videodpo_ray.models.transformer_family import DiffusersTransformerModel
from videodpo_ray.training.checkpoint import load_exported_model, write_export

pytestmark = pytest.mark.usefixtures("single_torch_thread")
SEED = 0
LORA = {"rank": 4}


def build(family: str, seed: int = SEED, **overrides) -> VideoDiffusionModel:
    return build_model(ModelConfig(family=family, variant="tiny", **overrides), seed=seed)


def probe(model: VideoDiffusionModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents of two random videos of the model's default size, timesteps and prompt embeddings."""
    generator = torch.Generator().manual_seed(1)
    frames, height, width = model.video_size
    videos = torch.randint(0, 256, (2, frames, height, width, 3), dtype=torch.uint8, generator=generator)
    latents = model.encode_videos(videos)
    timesteps = torch.tensor([100, 800])
    noisy = model.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)
    return noisy, timesteps, model.encode_prompts(["a red fox in the snow", "a city at night"])


def perturb(model: VideoDiffusionModel) -> None:
    """Move every trainable weight (LoRA init has B = 0: the policy would equal the base model)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


@torch.no_grad()
def prediction(model: VideoDiffusionModel, inputs: tuple[torch.Tensor, ...], reference: bool = False) -> torch.Tensor:
    return model.predict(*inputs, reference=reference)


def test_the_registry_lists_every_family():
    assert families() == tuple(FAMILIES) and {"vc2", "t2v_turbo", "cogvideox"} <= set(families())
    for family in families():
        assert model_class(family).family == family
    with pytest.raises(ConfigError, match="unknown model family 'sd3'; registered: vc2, "):
        model_class("sd3")
    with pytest.raises(ConfigError, match="family: Value error, unknown model family 'sd3'"):
        build_config(ModelConfig, {"family": "sd3"})


@pytest.mark.parametrize("family", families())
def test_lora_reference_is_exactly_the_base_model(family: str):
    base = build(family, finetune="full")
    model = build(family, finetune="lora", lora=LORA)
    names = [name for name, p in model.denoiser.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert model.reference_denoiser is None
    perturb(model)
    inputs = probe(base)
    expected = prediction(base, inputs)
    policy = prediction(model, inputs)
    assert torch.equal(prediction(model, inputs, reference=True), expected)
    assert not torch.allclose(policy, expected)
    assert torch.equal(prediction(model, inputs), policy)  # adapters back on afterwards
    assert all(p.requires_grad for p in model.trainable_parameters())


@pytest.mark.parametrize("family", families())
def test_the_frozen_reference_copy_stays_in_eval_mode(family: str):
    """`model.train()` (as a trainer calls it) puts the policy in train mode, never the reference copy: a dropout
    there would make the DPO reference random."""
    model = build(family, finetune="full")
    model.train()
    assert model.denoiser.training and not any(m.training for m in model.reference_denoiser.modules())
    model.eval()
    assert not model.denoiser.training


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("family", families())
def test_trainable_state_is_a_copy_that_round_trips_strictly(family: str, finetune: str, tmp_path: Path):
    config = ModelConfig(family=family, variant="tiny", finetune=finetune, lora=LORA)
    model = build_model(config, seed=SEED)
    perturb(model)
    inputs = probe(model)
    expected = prediction(model, inputs)
    state = model.trainable_state_dict()
    assert list(state) == [name for name, p in model.denoiser.named_parameters() if p.requires_grad]

    before = {name: p.detach().clone() for name, p in model.denoiser.named_parameters()}
    for tensor in model.trainable_state_dict().values():
        tensor.add_(1.0)
    assert all(torch.equal(p, before[name]) for name, p in model.denoiser.named_parameters())
    assert all(torch.equal(tensor, before[name]) for name, tensor in state.items())

    export = str(tmp_path / "export")
    write_export(state, config, export, step=1, dtype="float32", init_seed=SEED)
    assert torch.equal(prediction(load_exported_model(export), inputs), expected)
    fresh = build_model(config, seed=SEED)
    assert not torch.equal(prediction(fresh, inputs), expected)
    fresh.load_trainable_state_dict(state)
    assert torch.equal(prediction(fresh, inputs), expected)

    first = next(iter(state))
    key = re.escape(first)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): bogus\.weight$"):
        fresh.load_trainable_state_dict(state | {"bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {key}$"):
        fresh.load_trainable_state_dict({name: tensor for name, tensor in state.items() if name != first})
    with pytest.raises(CheckpointError, match=rf"shape mismatches \(checkpoint != model\) \(1\): {key} \(3, 1\) != "):
        fresh.load_trainable_state_dict(state | {first: torch.zeros(3, 1)})
    assert torch.equal(prediction(fresh, inputs), expected)  # a refused state dict changes nothing


@pytest.mark.parametrize("family", families())
def test_gradient_checkpointing_is_set_by_the_config_and_switched_on_a_built_model(family: str):
    """The train job's memory probe switches it on the model it built (`model.gradient_checkpointing: auto`)."""
    assert build(family, gradient_checkpointing=True).denoiser.is_gradient_checkpointing
    model = build(family, gradient_checkpointing="auto")  # a sampler's config may say auto: built without
    assert not model.denoiser.is_gradient_checkpointing
    model.set_gradient_checkpointing(True)
    assert model.denoiser.is_gradient_checkpointing
    model.set_gradient_checkpointing(False)
    assert not model.denoiser.is_gradient_checkpointing



@pytest.mark.parametrize("family", families())
def test_the_sampler_starts_from_latents_the_vae_makes_and_decodes_to_the_asked_size(family: str):
    """`latent_shape` (what `sample` draws its noise in) is the shape `encode_videos` gives, and a sample of that
    size decodes to it."""
    model = build(family)
    frames, height, width = model.video_size
    videos = torch.zeros((1, frames, height, width, 3), dtype=torch.uint8)
    assert tuple(model.encode_videos(videos).shape[1:]) == tuple(model.latent_shape(frames, height, width))
    sampled = model.sample(["a red car"], [3], num_inference_steps=1)
    assert sampled.dtype == torch.uint8 and tuple(sampled.shape) == (1, frames, height, width, 3)
    with pytest.raises(ValueError):
        model.latent_shape(frames, height + 1, width)


@pytest.mark.parametrize("family", families())
def test_a_prediction_on_wrong_shapes_names_the_shapes_it_takes(family: str):
    model = build(family)
    noisy, timesteps, text = probe(model)
    assert tuple(text.shape[1:]) == model.text_shape  # what encode_prompts gives is what predict takes
    length, width = model.text_shape
    shown = length if model.fixed_text_length else "L"
    expected_text = rf"expected text embeddings \(B, {shown}, {width}\), got \(2, {length}, {width + 1}\)"
    with pytest.raises(ValueError, match=expected_text):
        model.predict(noisy, timesteps, torch.zeros(2, length, width + 1))
    axis = model.latent_layout.split(", ").index("C")
    fewer_channels = noisy.narrow(axis, 0, noisy.shape[axis] - 1)
    expected_latents = re.escape(model.latent_layout.replace("C", str(noisy.shape[axis])))
    with pytest.raises(ValueError, match=rf"expected latents \({expected_latents}\), got \(2, "):
        model.predict(fewer_channels, timesteps, text)


# --- the formulas every family shares (functional.py) ----------------------------------------------------------------
def test_pixels_round_trip_through_the_vae_range_exactly():
    pixels = torch.arange(256, dtype=torch.uint8)
    signed = pixels_to_vae_input(pixels, torch.float32)
    assert signed[0] == -1.0 and signed[255] == 1.0 and signed[51] == pytest.approx(51 / 127.5 - 1.0, abs=0)
    assert torch.equal(vae_output_to_pixels(signed), pixels)
    assert vae_output_to_pixels(torch.tensor([-3.0, 2.0, 0.0])).tolist() == [0, 255, 128]  # clamped; 127.5 rounds up
    assert pixels_to_vae_input(pixels, torch.bfloat16).dtype == torch.bfloat16


def test_classifier_free_guidance_runs_both_rows_in_one_call_and_combines_them():
    calls = []

    def denoise(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], t.tolist()))
        return x * text[:, 0, :1]  # the "prediction" scales x by the embedding's first value

    latents, timesteps = torch.ones(2, 3), torch.tensor([5, 7])
    text, empty = torch.full((2, 4, 8), 3.0), torch.ones(1, 4, 8)
    embeddings = guidance_embeddings(text, empty)  # once per sampling loop: [text; empty]
    assert embeddings[:, 0, 0].tolist() == [3.0, 3.0, 1.0, 1.0]
    guided = classifier_free_guidance(denoise, latents, timesteps, embeddings, 2.0)
    assert calls == [(4, [5, 7, 5, 7])]
    torch.testing.assert_close(guided, torch.full((2, 3), 1.0 + 2.0 * (3.0 - 1.0)), rtol=0, atol=0)
    plain = guidance_embeddings(text, None)  # no empty embedding: no guidance
    assert plain is text
    torch.testing.assert_close(classifier_free_guidance(denoise, latents, timesteps, plain, 2.0),
                               torch.full((2, 3), 3.0), rtol=0, atol=0)
    assert calls[-1] == (2, [5, 7])


@pytest.mark.parametrize(
    "family", [family for family in families() if issubclass(model_class(family), DiffusersTransformerModel)]
)
def test_a_text_encoder_directory_without_its_tokenizer_is_refused_naming_it(family: str, tmp_path: Path):
    (tmp_path / "text_encoder").mkdir()
    name = model_class(family).text_encoder_name
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))}: no tokenizer/ folder for the {name} "):
        build(family, text_encoder_path=str(tmp_path))
    model = build(family, text_encoder_path=str(tmp_path), build_text_encoder=False)  # for stored embeddings
    with pytest.raises(RuntimeError, match=f"has no {name} text encoder: set ModelConfig.text_encoder_path"):
        model.encode_prompts(["a red car"])


@pytest.mark.parametrize("family", families())
def test_the_latent_space_is_the_family_and_its_vae_settings_not_the_weights(family: str):
    model, other_weights = build(family), build(family, seed=SEED + 1)
    assert model.latent_space == other_weights.latent_space and model.latent_space.startswith(f"{family}:")
    model.vae.register_to_config(scaling_factor=2 * getattr(model.vae.config, "scaling_factor", 1.0))
    assert model.latent_space != other_weights.latent_space  # stored latents of the other scale are refused


@pytest.mark.parametrize("family", families())
def test_presets_are_listed_by_name(family: str):
    presets = model_class(family).presets()
    assert "tiny" in presets and len(set(presets)) == len(presets)
    listed = re.escape(", ".join(presets))
    with pytest.raises(ConfigError, match=rf"model\.variant='huge': {family} presets are {listed}$"):
        build_model(ModelConfig(family=family, variant="huge"))


@pytest.mark.parametrize("family", families())
def test_local_directory_and_s3_url_load_the_same(family: str, tmp_path: Path, monkeypatch, s3_bucket: str):
    monkeypatch.setenv("VIDEODPO_RAY_CACHE", str(tmp_path / "cache"))
    original = build(family)
    directory = original.save_pretrained(tmp_path / "local")
    url = f"{s3_bucket}/{family}-tiny"
    fsspec.filesystem("s3").put(str(directory) + "/", url.removeprefix("s3://"), recursive=True)

    # other seeds: whatever the saved directory lacked would come out different
    local = build_model(ModelConfig(family=family, variant="tiny", path=str(directory)), seed=SEED + 1)
    remote = build_model(ModelConfig(family=family, variant="tiny", path=url), seed=SEED + 2)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # downloaded once, into the cache
    inputs = probe(original)
    expected = prediction(original, inputs)
    for loaded in (local, remote):
        assert torch.equal(prediction(loaded, inputs), expected)
        assert torch.equal(prediction(loaded, inputs, reference=True), expected)
        assert torch.equal(loaded.encode_prompts(["a cat"]), original.encode_prompts(["a cat"]))
        loaded_state, original_state = loaded.state_dict(), original.state_dict()
        assert list(loaded_state) == list(original_state)
        assert all(torch.equal(loaded_state[name], value) for name, value in original_state.items())

    with pytest.raises(ConfigError, match="save_pretrained writes base weights only"):
        build(family, finetune="lora", lora=LORA).save_pretrained(tmp_path / "lora")
