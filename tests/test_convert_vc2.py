"""The VC2 converter: rule-wise key map, the shared lvdm fixture, a second VC2 shape, strict errors, fsspec, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from videodpo_ray.cli import app
from videodpo_ray.errors import CheckpointError
from videodpo_ray.models.convert_vc2 import components_from_checkpoint, load_components, read_unet_kwargs
from videodpo_ray.models.lvdm_layout import (
    UNET_PREFIX,
    LvdmUNetConfig,
    infer_lvdm_unet_config,
    key_map,
    to_reference_state_dict,
)
from videodpo_ray.models.openclip_text import OpenCLIPTextEncoder
from videodpo_ray.models.vc2_schedule import VC2NoiseSchedule
from videodpo_ray.models.vc2_unet import VC2UNet3DConditionModel

pytestmark = pytest.mark.usefixtures("single_torch_thread")
TSV = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vc2_to_diffusers_keymap.tsv"
TOL = 1e-4


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_against_expected(components, expected: dict) -> None:
    """UNet output, VAE posterior mean and decode, and scale_arr q_sample against the lvdm reference outputs."""
    unet_in, q = expected["unet_in"], expected["q_sample"]
    with torch.no_grad():
        out = components.unet(
            unet_in["x"], unet_in["t"], encoder_hidden_states=unet_in["context"], fps=unet_in["fps"]
        ).sample
        mean = components.vae.encode(expected["vae_in"]).latent_dist.mean
        decoded = components.vae.decode(expected["vae_z"]).sample
    xt = VC2NoiseSchedule(components.schedule).q_sample(q["x0"], q["noise"], q["t"])
    assert max_error(out, expected["unet_out"]) < TOL
    assert max_error(mean, expected["vae_posterior_mean"]) < TOL
    assert max_error(decoded, expected["vae_decoded"]) < TOL
    assert max_error(xt, q["xt"]) < TOL


@pytest.fixture(scope="module")
def expected(vc2_tiny_dir: Path) -> dict:
    return torch.load(vc2_tiny_dir / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def converted_dir(vc2_tiny_dir: Path, tmp_path_factory) -> Path:
    """The fixture converted once through the CLI (with its config.json kwargs)."""
    out = tmp_path_factory.mktemp("vc2-converted")
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "vc2",
            "--checkpoint",
            str(vc2_tiny_dir / "model.ckpt"),
            "--out",
            str(out),
            "--config",
            str(vc2_tiny_dir / "config.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_rule_wise_key_map_reproduces_the_full_size_reference_table():
    table, squeezed = {}, set()
    for line in TSV.read_text().splitlines()[1:]:
        diffusers_key, reference_key, note = (line.split("\t") + [""])[:3]
        table[reference_key] = diffusers_key
        if note:
            squeezed.add(reference_key)
    mapping = key_map(LvdmUNetConfig())  # lvdm defaults = the real VC2 config
    assert mapping == table and len(mapping) == 1484
    assert squeezed == {"init_attn.0.proj_in.weight", "init_attn.0.proj_out.weight"}


def test_fixture_checkpoint_reproduces_reference_outputs(vc2_tiny_dir: Path, expected: dict):
    kwargs = read_unet_kwargs(str(vc2_tiny_dir / "config.json"))
    components = components_from_checkpoint(str(vc2_tiny_dir / "model.ckpt"), unet_kwargs=kwargs)
    check_against_expected(components, expected)
    state = torch.load(vc2_tiny_dir / "model.ckpt", weights_only=True)["state_dict"]
    unet_state = {k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    # the shapes alone give the same UNet config as the fixture's lvdm kwargs
    assert infer_lvdm_unet_config(unet_state).diffusers_config() == LvdmUNetConfig(**kwargs).diffusers_config()
    assert list(key_map(LvdmUNetConfig(**kwargs))) == list(unet_state)  # lvdm order too
    assert components.schedule.use_scale and components.schedule.scale_b == pytest.approx(0.7)
    assert components.text_encoder is None


def test_converted_directory_reproduces_reference_outputs(converted_dir: Path, expected: dict):
    for part in ("unet", "vae"):
        assert (converted_dir / part / "config.json").is_file()
        assert (converted_dir / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (converted_dir / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((converted_dir / "model_index.json").read_text())["family"] == "vc2"
    assert not (converted_dir / "text_encoder").exists()  # the fixture has no cond_stage_model
    check_against_expected(load_components(str(converted_dir)), expected)


def test_original_file_and_converted_directory_load_from_s3(
    vc2_tiny_dir: Path, converted_dir: Path, expected: dict, s3_bucket: str, tmp_path: Path, monkeypatch
):
    monkeypatch.setenv("VIDEODPO_RAY_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    fs.put(str(vc2_tiny_dir / "model.ckpt"), f"{s3_bucket}/original/model.ckpt")
    fs.put(str(converted_dir), f"{s3_bucket}/converted", recursive=True)
    check_against_expected(load_components(f"{s3_bucket}/original/model.ckpt"), expected)
    check_against_expected(load_components(f"{s3_bucket}/converted"), expected)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cached download each: the file and the directory


def _second_vc2_shape() -> tuple[LvdmUNetConfig, VC2UNet3DConditionModel]:
    """Two levels, mult (1, 3), attention only at the second level, 1 res block, context 24, no fps conditioning."""
    layout = LvdmUNetConfig(
        model_channels=32,
        channel_mult=[1, 3],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_head_channels=8,
        context_dim=24,
        fps_cond=False,
        temporal_length=8,
    )
    torch.manual_seed(0)
    unet = VC2UNet3DConditionModel(**layout.diffusers_config())
    with torch.no_grad():  # diffusers zero-inits some output layers; make every weight matter
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return layout, unet


def test_another_vc2_shaped_config_converts_and_loads(vc2_tiny_dir: Path, tmp_path: Path):
    layout, unet = _second_vc2_shape()
    state = torch.load(vc2_tiny_dir / "model.ckpt", weights_only=True)["state_dict"]
    lvdm = {UNET_PREFIX + k: v for k, v in to_reference_state_dict(unet.state_dict(), layout).items()}
    assert lvdm[UNET_PREFIX + "init_attn.0.proj_in.weight"].ndim == 3  # Conv1d in lvdm layout
    vae_and_buffers = {k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)}
    torch.save({"state_dict": lvdm | vae_and_buffers}, tmp_path / "model.ckpt")

    result = CliRunner().invoke(
        app, ["convert", "vc2", "--checkpoint", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    loaded = load_components(str(tmp_path / "out"))
    assert loaded.unet_layout.diffusers_config() == layout.diffusers_config()
    x = torch.randn(1, 4, 3, 8, 8)
    context = torch.randn(1, 5, 24)
    with torch.no_grad():
        reference = unet(x, torch.tensor([321]), encoder_hidden_states=context).sample
        converted = loaded.unet(x, torch.tensor([321]), encoder_hidden_states=context).sample
    assert torch.equal(reference, converted)


def test_missing_and_unexpected_keys_are_listed(vc2_tiny_dir: Path, tmp_path: Path):
    state = torch.load(vc2_tiny_dir / "model.ckpt", weights_only=True)["state_dict"]
    broken = dict(state)
    del broken[UNET_PREFIX + "middle_block.1.proj_in.bias"]
    broken[UNET_PREFIX + "output_blocks.0.9.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "unet.ckpt")
    with pytest.raises(CheckpointError) as error:
        components_from_checkpoint(
            str(tmp_path / "unet.ckpt"), unet_kwargs=read_unet_kwargs(str(vc2_tiny_dir / "config.json"))
        )
    assert "missing keys (1): middle_block.1.proj_in.bias" in str(error.value)
    assert "unexpected keys (1): output_blocks.0.9.extra.weight" in str(error.value)

    broken = dict(state)
    del broken["first_stage_model.decoder.conv_out.bias"]
    torch.save({"state_dict": broken}, tmp_path / "vae.ckpt")
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        components_from_checkpoint(str(tmp_path / "vae.ckpt"))

    torch.save({"state_dict": state | {"model_ema.decay": torch.zeros(())}}, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match="model_ema.decay"):
        components_from_checkpoint(str(tmp_path / "extra.ckpt"))

    converted = tmp_path / "converted"
    assert (
        CliRunner()
        .invoke(app, ["convert", "vc2", "--checkpoint", str(vc2_tiny_dir / "model.ckpt"), "--out", str(converted)])
        .exit_code
        == 0
    )
    from safetensors.torch import load_file, save_file

    weights = converted / "unet" / "diffusion_pytorch_model.safetensors"
    unet_state = load_file(weights)
    del unet_state["conv_out.bias"]
    save_file(unet_state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): conv_out\.bias"):
        load_components(str(converted))


def test_cli_reports_a_bad_checkpoint(tmp_path: Path):
    torch.save({"state_dict": {"model.other.weight": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    result = CliRunner().invoke(
        app, ["convert", "vc2", "--checkpoint", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "model.other.weight" in result.output
    assert not (tmp_path / "o").exists()


def test_unsupported_lvdm_options_are_refused():
    with pytest.raises(CheckpointError, match="use_relative_position=True"):
        LvdmUNetConfig(use_relative_position=True, temporal_length=16).diffusers_config()
    with pytest.raises(CheckpointError, match="multiples of 32"):
        LvdmUNetConfig(model_channels=48).diffusers_config()


def _tiny_openclip_text_tower():
    from open_clip.transformer import TextTransformer

    torch.manual_seed(0)
    return TextTransformer(width=64, heads=1, layers=3, output_dim=64).eval()


def _penultimate(tower, tokens: torch.Tensor) -> torch.Tensor:
    """lvdm FrozenOpenCLIPEmbedder(layer="penultimate"): all blocks but the last, then ln_final."""
    x = tower.token_embedding(tokens) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


def test_openclip_text_encoder_matches_the_penultimate_layer(vc2_tiny_dir: Path, tmp_path: Path):
    tower = _tiny_openclip_text_tower()
    state = torch.load(vc2_tiny_dir / "model.ckpt", weights_only=True)["state_dict"]
    text = {f"cond_stage_model.model.{k}": v for k, v in tower.state_dict().items()}
    torch.save({"state_dict": state | text}, tmp_path / "model.ckpt")
    result = CliRunner().invoke(
        app, ["convert", "vc2", "--checkpoint", str(tmp_path / "model.ckpt"), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    encoder = load_components(str(tmp_path / "out")).text_encoder
    assert isinstance(encoder, OpenCLIPTextEncoder) and encoder.text_model.config.num_hidden_layers == 2

    prompts = ["a corgi surfing a wave at sunset", ""]
    tokens = encoder.tokenize(prompts)
    assert tokens.shape == (2, 77)
    assert tokens[1, :3].tolist() == [49406, 49407, 0]  # SOT, EOT, padding
    with torch.no_grad():
        assert max_error(encoder(prompts), _penultimate(tower, tokens)) < 1e-5
