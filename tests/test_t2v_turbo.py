"""T2V-Turbo: released LoRA list merged in lvdm order, w embedding, both DPO reference modes, LCM sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from videodpo_ray.cli import app
from videodpo_ray.errors import CheckpointError, ConfigError
from videodpo_ray.models import ModelConfig, build_model
from videodpo_ray.models.t2v_turbo import T2VTurbo, guidance_scale_embedding, lcm_timesteps

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def turbo_expected(vc2_tiny_dir: Path) -> dict:
    return torch.load(vc2_tiny_dir / "turbo_expected.pt", weights_only=True)


def fixture_config(vc2_tiny_dir: Path, **overrides) -> ModelConfig:
    values = {
        "family": "t2v_turbo",
        "path": str(vc2_tiny_dir / "turbo_base_model.ckpt"),
        "turbo_lora_path": str(vc2_tiny_dir / "unet_lora.pt"),
        "finetune": "lora",
    }
    return ModelConfig(**(values | overrides))


def unet_output(unet, unet_in: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(
            unet_in["x"],
            unet_in["t"],
            encoder_hidden_states=unet_in["context"],
            fps=unet_in["fps"],
            timestep_cond=guidance_scale_embedding(unet_in["guidance_w"]),
        ).sample


def test_w_embedding_matches_the_reference(turbo_expected: dict):
    unet_in = turbo_expected["unet_in"]
    embedding = guidance_scale_embedding(unet_in["guidance_w"])
    # sin/cos arguments reach w*1000 = 7500 rad, where float32 spacing is 4.9e-4: the last-bit rounding of the
    # frequencies alone moves an entry by up to that much, so this is the float32 resolution of the embedding.
    torch.testing.assert_close(embedding, unet_in["w_embedding"], rtol=0, atol=1e-3)
    assert embedding.shape == (2, 256)
    assert lcm_timesteps(4) == [999, 759, 519, 279]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 519, 399, 279, 159]


@pytest.mark.parametrize("mode", ["merge_and_new", "train_released"])
def test_base_plus_released_lora_reproduces_reference_output(mode: str, vc2_tiny_dir: Path, turbo_expected: dict):
    model = T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_mode=mode))
    unet_in, expected = turbo_expected["unet_in"], turbo_expected["unet_out"]
    assert (unet_output(model.unet, unet_in) - expected).abs().max() < 1e-4
    with model.reference_model() as reference:  # merge_and_new: adapters off; train_released: frozen released LoRA
        assert (unet_output(reference, unet_in) - expected).abs().max() < 1e-4
    if mode == "train_released":
        released = [name for name in model.trainable_state_dict() if ".lora_A.released." in name]
        assert len(released) == turbo_expected["lora_modules"] == 414


def test_converted_turbo_directory(vc2_tiny_dir: Path, turbo_expected: dict, tmp_path: Path):
    out = tmp_path / "turbo"
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "vc2",
            "--checkpoint",
            str(vc2_tiny_dir / "turbo_base_model.ckpt"),
            "--lora",
            str(vc2_tiny_dir / "unet_lora.pt"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    model = T2VTurbo.from_config(ModelConfig(family="t2v_turbo", path=str(out), finetune="full"))
    assert (unet_output(model.unet, turbo_expected["unet_in"]) - turbo_expected["unet_out"]).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="already merged"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, path=str(out)))


@pytest.mark.parametrize("mode", ["merge_and_new", "train_released"])
def test_a_merged_run_records_that_the_released_lora_is_in_its_weights(vc2_tiny_dir: Path, mode: str,
                                                                       tmp_path: Path):
    """`export --merged` folds the trained adapter in; in train_released that adapter is the released LoRA itself, so
    loading the directory with model.turbo_lora_path must be refused, not merge the LoRA a second time."""
    model = T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_mode=mode))
    model.merge_lora()
    model.save_pretrained(tmp_path / "merged")
    with pytest.raises(ConfigError, match="already merged"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, path=str(tmp_path / "merged"), turbo_lora_mode=mode))


def test_vc2_weights_without_the_released_lora_are_refused(vc2_tiny_dir: Path, tmp_path: Path):
    """4-step LCM sampling on the undistilled VC2 weights draws noise: the LoRA (or a directory with it) is needed."""
    with pytest.raises(ConfigError, match=r"turbo_base_model\.ckpt: VideoCrafter2 weights without the T2V-Turbo LoRA"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_path=None))
    T2VTurbo.tiny().save_pretrained(tmp_path / "turbo")  # a T2V-Turbo directory loads as it is
    T2VTurbo.from_config(fixture_config(vc2_tiny_dir, path=str(tmp_path / "turbo"), variant="tiny",
                                        turbo_lora_path=None))


def test_wrong_lora_lists_are_refused(vc2_tiny_dir: Path, tmp_path: Path):
    lora = torch.load(vc2_tiny_dir / "unet_lora.pt", weights_only=True)
    torch.save(lora[:-2], tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="826 tensors .* 414 Linear/Conv2d/Conv3d modules"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_path=str(tmp_path / "short.pt")))
    swapped = list(lora)
    swapped[0], swapped[1] = lora[1], lora[0]
    torch.save(swapped, tmp_path / "swapped.pt")
    for mode in ("merge_and_new", "train_released"):
        with pytest.raises(CheckpointError, match="LoRA pair 0 .* time_embed.0"):
            T2VTurbo.from_config(
                fixture_config(vc2_tiny_dir, turbo_lora_path=str(tmp_path / "swapped.pt"), turbo_lora_mode=mode)
            )
    torch.save({"up": lora[0]}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="expected a list"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_path=str(tmp_path / "dict.pt")))


def test_train_released_needs_lora_finetune_and_the_released_file(vc2_tiny_dir: Path):
    with pytest.raises(ConfigError, match="finetune='lora'"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_mode="train_released", finetune="full"))
    with pytest.raises(ConfigError, match="turbo_lora_path"):
        T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_mode="train_released", turbo_lora_path=None))


@pytest.mark.parametrize(
    ("mode", "finetune", "ln2_atol"),
    [
        ("train_released", "lora", 1e-3),  # reference = a second copy of the released factors (CPU GEMM last bits)
        ("merge_and_new", "lora", 0.0),  # reference = adapters off on the merged base: exact
        ("merge_and_new", "full", 1e-3),
        ("merge_and_new", "temporal", 1e-3),
    ],
)
def test_dpo_step_changes_only_trainable_parameters(
    mode, finetune, ln2_atol, vc2_tiny_dir: Path, turbo_expected: dict, check_dpo_step
):
    model = T2VTurbo.from_config(fixture_config(vc2_tiny_dir, turbo_lora_mode=mode, finetune=finetune))
    generator = torch.Generator().manual_seed(5)
    win, lose = torch.randn(1, 4, 2, 8, 8, generator=generator), torch.randn(1, 4, 2, 8, 8, generator=generator)
    check_dpo_step(model, win, lose, turbo_expected["unet_in"]["context"][:1], ln2_atol=ln2_atol)
    if mode == "train_released":
        names = set(model.trainable_state_dict())
        assert names and all(".released." in name for name in names)


def test_dpo_timesteps_lie_on_the_ddim_grid_and_noising_has_no_scale_arr():
    torch.manual_seed(0)
    model = T2VTurbo.tiny()
    steps = model.sample_timesteps(2000, torch.Generator().manual_seed(0))
    assert set(steps.tolist()) == set(range(19, 1000, 20))
    x0, noise, t = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 4, 2, 8, 8), torch.tensor([19, 999])
    abar = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(model.add_noise(x0, noise, t), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_lcm_sampling_is_deterministic_and_checkpointing_keeps_gradients(monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="t2v_turbo", finetune="lora"))
    assert isinstance(model, T2VTurbo)
    first = model.sample(["a cat", "a dog"], [1, 2], num_inference_steps=2)
    assert first.shape == (2, 4, 16, 16, 3) and first.dtype == torch.uint8
    assert torch.equal(first, model.sample(["a cat", "a dog"], [1, 2], num_inference_steps=2))
    assert not torch.equal(first, model.sample(["a cat", "a dog"], [3, 4], num_inference_steps=2))

    from videodpo_ray.training.step import dpo_step

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = T2VTurbo.tiny(ModelConfig(family="t2v_turbo", finetune="full", gradient_checkpointing=checkpointing))
        win = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
        out = dpo_step(
            model,
            win,
            win.flip(-1),
            torch.randn(1, 5, 64),
            None,
            beta_dpo=5000.0,
            generator=torch.Generator().manual_seed(0),
        )
        out.loss.backward()
        return [p.grad for p in model.trainable_parameters()]

    plain = gradients(False)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    checkpointed = gradients(True)
    assert calls
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
