"""MUSIQ architecture (pyiqa key layout, strict loading, multi-scale tokens) and VBench imaging quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videodpo_ray.errors import WeightsError
from videodpo_ray.scoring import ModelSpec, load_scorer_model
from videodpo_ray.scoring import imaging_quality as iq
from videodpo_ray.scoring.musiq import MUSIQ, TINY_MUSIQ_CONFIG, load_musiq, multiscale_patches


@pytest.fixture(scope="module")
def tiny_musiq() -> MUSIQ:
    return iq.tiny_model().eval()


def test_real_config_has_the_pyiqa_spaq_layout() -> None:
    with torch.device("meta"):
        state = MUSIQ().state_dict()
    # shapes derived by hand from pyiqa MUSIQ(num_class=1): patch 32, hidden 384, mlp 1152, 14 layers, grid 10
    expected = {
        "conv_root.weight": (64, 3, 7, 7),
        "gn_root.weight": (64,),
        "block1.conv2.weight": (64, 64, 3, 3),
        "block1.conv_proj.weight": (256, 64, 1, 1),
        "block1.gn_proj.bias": (256,),
        "embedding.weight": (384, 256 * 8 * 8),
        "transformer_encoder.posembed_input.position_emb": (1, 100, 384),
        "transformer_encoder.scaleembed_input.scale_emb": (3, 384),
        "transformer_encoder.cls": (1, 1, 384),
        "transformer_encoder.transformer.encoderblock_13.attention.value.bias": (384,),
        "transformer_encoder.transformer.encoderblock_0.mlp.fc1.weight": (1152, 384),
        "transformer_encoder.encoder_norm.weight": (384,),
        "head.weight": (1, 384),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 17 + 5 + 14 * 16 + 2
    assert sum(v.numel() for v in state.values()) == 27_125_825  # the paper's "27M"


def test_multiscale_tokens_match_the_hand_derived_layout() -> None:
    image = torch.rand(1, 3, 20, 28)
    tokens = multiscale_patches(image, TINY_MUSIQ_CONFIG)
    # longer side 16 -> 11 x 16 -> 2 x 2 patches (max 4); 24 -> 17 x 24 -> 3 x 3 (max 9); original 20 x 28 -> 3 x 4
    assert tokens.shape == (1, 4 + 9 + 12, 3 * 8 * 8 + 3)
    spatial, scale, mask = tokens[0, :, -3], tokens[0, :, -2], tokens[0, :, -1]
    assert spatial.tolist() == [0, 2, 8, 10] + [0, 1, 2, 4, 5, 6, 8, 9, 10] + list(range(12))
    assert scale.tolist() == [0] * 4 + [1] * 9 + [2] * 12
    assert mask.eq(1).all()
    # first original-resolution patch: SAME padding of 20 x 28 to 24 x 32 puts 2 zero rows / columns first
    first = tokens[0, 13, :-3].view(3, 8, 8)
    assert first[:, :2].eq(0).all() and first[:, :, :2].eq(0).all()
    assert torch.equal(first[:, 2:, 2:], image[0, :, :6, :6])


def test_multiscale_tokens_pad_short_scales_with_masked_tokens() -> None:
    tokens = multiscale_patches(torch.rand(2, 3, 28, 12), TINY_MUSIQ_CONFIG)
    # longer 24 -> 24 x 10 -> 3 x 2 = 6 patches, padded to 9 with zero tokens (mask 0)
    assert tokens[:, 4:13, -1].tolist() == [[1.0] * 6 + [0.0] * 3] * 2
    assert tokens[:, 10:13].eq(0).all()


def test_load_musiq_round_trips_a_flat_state_dict(tmp_path, tiny_musiq: MUSIQ) -> None:
    path = tmp_path / "musiq_spaq_ckpt-358bb6af.pth"
    torch.save(tiny_musiq.state_dict(), path)
    loaded = load_musiq(str(path), TINY_MUSIQ_CONFIG)
    for key, value in tiny_musiq.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_load_musiq_rejects_a_mismatching_checkpoint(tmp_path, tiny_musiq: MUSIQ, defect: str) -> None:
    state = dict(tiny_musiq.state_dict())
    if defect == "missing":
        del state["transformer_encoder.cls"]
        needle = "missing keys.*transformer_encoder.cls"
    elif defect == "unexpected":
        state["head.0.weight"] = torch.zeros(10, 32)  # an AVA (10-class) head
        needle = "unexpected keys.*head.0.weight"
    else:
        state["transformer_encoder.scaleembed_input.scale_emb"] = torch.zeros(2, 32)
        needle = "scale_emb"
    path = tmp_path / "musiq.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=needle):
        load_musiq(str(path), TINY_MUSIQ_CONFIG)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (600, 1000, (307, 512)),
        (1080, 1920, (288, 512)),
        (640, 360, (512, 288)),
        (512, 300, (512, 300)),
        (40, 64, (40, 64)),
    ],
)
def test_longer_side_resize_rule(height: int, width: int, expected: tuple[int, int]) -> None:
    frames = torch.rand(1, 3, height, width) * 255
    resized = iq.resize_longer_side(frames)
    assert tuple(resized.shape[-2:]) == expected
    if expected == (height, width):
        assert resized is frames


@pytest.mark.parametrize(("height", "width", "resized"), [(36, 52, None), (600, 200, (512, 170))])
def test_imaging_quality_is_mean_mos_over_100(tiny_musiq: MUSIQ, height: int, width: int, resized) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    mos = []
    with torch.no_grad():
        for frame in frames:
            image = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
            if resized is not None:
                image = F.interpolate(image, size=resized, mode="bilinear", align_corners=False, antialias=False)
            mos.append(tiny_musiq(image / 255.0).item())
    assert iq.score(frames, tiny_musiq) == pytest.approx(np.mean(mos) / 100.0, abs=1e-7)
    assert np.isfinite(mos).all() and len(set(mos)) == 3


def test_score_batch_equals_score_per_video_and_registry_loads_tiny(tiny_musiq: MUSIQ) -> None:
    model = load_scorer_model("imaging_quality", ModelSpec(tiny=True))
    assert isinstance(model, MUSIQ) and not model.training
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(2, 30, 40, 3), (3, 24, 24, 3), (1, 30, 40, 3)]]
    assert iq.score_batch(videos, model) == pytest.approx([iq.score(v, model) for v in videos], abs=1e-7)
