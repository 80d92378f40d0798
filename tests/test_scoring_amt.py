"""AMT-S architecture (original key layout, strict loading) and VBench motion smoothness on a tiny random AMT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from videodpo_ray.errors import VideoTooShortError, WeightsError
from videodpo_ray.scoring import ModelSpec, load_scorer_model
from videodpo_ray.scoring import motion_smoothness as ms
from videodpo_ray.scoring.amt import AMTS, pad_to_multiple


@pytest.fixture(scope="module")
def tiny_amt() -> AMTS:
    return ms.tiny_model().eval()


def moving_square_video(num_frames: int, height: int, width: int) -> np.ndarray:
    """A textured background with a bright square moving 2 px right per frame (uint8 (T, H, W, 3))."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = np.stack([(xs * 5 + ys * 3) % 256, (xs * 2) % 256, (ys * 7) % 256], axis=-1)
        frame[4:12, 2 + 2 * t : 10 + 2 * t] = 250
        frames[t] = frame
    return frames


def test_real_config_has_the_released_amt_s_layout() -> None:
    state = AMTS().state_dict()
    # shapes derived by hand from MCG-NKU/AMT networks/AMT-S.py (channels 20/32/44/56, 3 flows, radius 3, 4 levels)
    expected = {
        "feat_encoder.conv1.weight": (32, 3, 7, 7),
        "feat_encoder.layer2.0.downsample.0.weight": (64, 32, 1, 1),
        "feat_encoder.conv2.weight": (84, 96, 1, 1),
        "encoder.pyramid4.0.0.weight": (56, 44, 3, 3),
        "encoder.pyramid4.1.1.weight": (56,),
        "decoder4.convblock.0.0.weight": (112, 113, 3, 3),
        "decoder4.convblock.1.conv2.0.weight": (20, 20, 3, 3),
        "decoder4.convblock.2.weight": (112, 48, 4, 4),
        "decoder3.convblock.0.0.weight": (132, 136, 3, 3),
        "decoder1.convblock.2.weight": (60, 24, 4, 4),
        "update4.convc1.weight": (64, 392, 1, 1),
        "update4.gru.0.weight": (76, 68 + 4 + 44, 3, 3),
        "update2.feat_head.2.weight": (20, 76, 3, 3),
        "update3.flow_head.2.weight": (4, 76, 3, 3),
        "comb_block.1.weight": (18,),
        "comb_block.2.weight": (3, 18, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 213
    assert sum(v.numel() for v in state.values()) == 2_990_543  # the paper's "2.99M parameters"


def test_load_model_round_trips_the_original_checkpoint_layout(tmp_path) -> None:
    source = AMTS()
    path = tmp_path / "amt-s.pth"
    # the AMT trainer's checkpoint: OrderedDict(epoch, state_dict, optim)
    torch.save({"epoch": 299, "state_dict": source.state_dict(), "optim": {"state": {}, "param_groups": []}}, path)
    loaded = ms.load_model(ModelSpec(weights=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("defect", ["missing", "unexpected", "flat"])
def test_load_model_rejects_a_mismatching_checkpoint(tmp_path, defect: str) -> None:
    state = AMTS().state_dict()
    if defect == "missing":
        del state["update3.convf1.weight"]
        checkpoint, needle = {"state_dict": state}, "update3.convf1.weight"
    elif defect == "unexpected":
        state["module.extra.weight"] = torch.zeros(1)
        checkpoint, needle = {"state_dict": state}, "module.extra.weight"
    else:
        checkpoint, needle = state, "'state_dict'"
    path = tmp_path / "amt-s.pth"
    torch.save(checkpoint, path)
    with pytest.raises(WeightsError, match=needle):
        ms.load_model(ModelSpec(weights=str(path)))


def test_pad_to_multiple_splits_like_amt_input_padder() -> None:
    images = torch.arange(21 * 38, dtype=torch.float32).view(1, 1, 21, 38)
    padded, padding = pad_to_multiple(images)
    assert padding == (5, 5, 5, 6)  # W 38 -> 48: 5 left, 5 right; H 21 -> 32: 5 top, 6 bottom
    assert padded.shape == (1, 1, 32, 48)
    assert torch.equal(padded[..., 5:26, 5:43], images)
    assert torch.equal(padded[..., 0, 0], images[..., 0, 0])  # replicate


def test_even_pairs_and_odd_targets_are_vbench_frames() -> None:
    frames = np.broadcast_to(np.arange(7, dtype=np.uint8)[:, None, None, None], (7, 2, 2, 3)).copy()
    pairs = ms.even_pairs(frames)
    assert pairs[:, 0, 0, 0, 0].tolist() == [0, 2, 4]
    assert pairs[:, 1, 0, 0, 0].tolist() == [2, 4, 6]


def test_smoothness_formula() -> None:
    odd = np.full((2, 4, 4, 3), 100, np.uint8)
    mids = odd.copy()
    mids[0] = 90  # |diff| 10 on frame 0, 0 on frame 1 -> mean 5
    assert ms.smoothness(odd, mids) == (255 - 5) / 255
    mids[1] = 255  # uint8 must not wrap: |100 - 255| = 155
    assert ms.smoothness(odd, mids) == pytest.approx((255 - (10 + 155) / 2) / 255, abs=1e-15)


@pytest.mark.parametrize("num_frames", [6, 7])
def test_motion_smoothness_equals_hand_computation_from_amt_outputs(tiny_amt: AMTS, num_frames: int) -> None:
    frames = moving_square_video(num_frames, 21, 38)
    diffs = []
    with torch.no_grad():
        for k in range((num_frames - 1) // 2):
            img0, img1 = (
                torch.from_numpy(frames[i]).permute(2, 0, 1)[None].float() / 255.0 for i in (2 * k, 2 * k + 2)
            )
            # 21 x 38 -> 32 x 48, padded (left 5, right 5, top 5, bottom 6), replicate
            img0, img1 = (F.pad(x, (5, 5, 5, 6), mode="replicate") for x in (img0, img1))
            middle = tiny_amt(img0, img1, torch.full((1, 1, 1, 1), 0.5))[0, :, 5:26, 5:43]
            assert torch.isfinite(middle).all()
            predicted = (middle * 255.0).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            diffs.append(np.abs(frames[2 * k + 1].astype(float) - predicted.astype(float)).mean())
    expected = (255.0 - np.mean(diffs)) / 255.0
    # the scorer batches the pairs: float noise may flip a truncated uint8 value by 1 (1 flip = 5.5e-7 here)
    assert ms.score(frames, tiny_amt) == pytest.approx(expected, abs=3e-6)
    # and exactly the formula on the scorer's own midpoints: odd frame 2k + 1 against midpoint k
    (midpoints,) = ms.midpoints_batch([frames], tiny_amt)
    odd = frames[1 : 2 * len(midpoints) : 2].astype(float)
    assert ms.score(frames, tiny_amt) == pytest.approx((255.0 - np.abs(odd - midpoints).mean()) / 255.0, abs=1e-12)


def test_score_batch_equals_score_per_video_of_mixed_sizes(tiny_amt: AMTS) -> None:
    rng = np.random.default_rng(0)
    videos = [
        moving_square_video(5, 16, 24),
        rng.integers(0, 256, (5, 20, 33, 3), dtype=np.uint8),
        moving_square_video(3, 16, 24),
        moving_square_video(4, 9, 30),
    ]
    batched = ms.score_batch(videos, tiny_amt)
    assert batched == pytest.approx([ms.score(v, tiny_amt) for v in videos], abs=1e-12)
    assert all(np.isfinite(batched)) and all(0.0 <= s <= 1.0 for s in batched)


def test_registry_loads_tiny_model_and_rejects_short_videos_and_float16() -> None:
    model = load_scorer_model("motion_smoothness", ModelSpec(tiny=True))
    assert isinstance(model, AMTS) and not model.training
    with pytest.raises(ValueError, match="at least 3 frames"):
        ms.score(np.zeros((2, 16, 16, 3), np.uint8), model)
    with pytest.raises(ValueError, match="float32 only"):
        ms.place(model, torch.device("cpu"), torch.float16)


def test_real_size_amt_s_runs_at_its_smallest_resolution_and_rejects_smaller() -> None:
    model = AMTS().eval()  # 4 correlation levels: 1/8 resolution pooled 3 times must stay >= 2 px
    assert model.min_size == 128
    frames = torch.from_numpy(moving_square_video(3, 128, 128)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        middle = model(frames[:1], frames[2:], torch.full((1, 1, 1, 1), 0.5))
    assert middle.shape == (1, 3, 128, 128) and torch.isfinite(middle).all()
    with pytest.raises(VideoTooShortError, match="frames of 100x140 pixels: AMT-S takes sides of at least 128 px"):
        ms.score(moving_square_video(3, 100, 140), model)  # pads to 112 x 144: that video's row fails, not its batch
