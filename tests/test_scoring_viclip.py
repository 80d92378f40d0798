"""ViCLIP architecture (original key layout, strict loading) and VBench overall consistency on a tiny random ViCLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip import tokenize as open_clip_tokenize
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from videodpo_ray.errors import WeightsError
from videodpo_ray.scoring import ModelSpec, load_scorer_model
from videodpo_ray.scoring import overall_consistency as oc
from videodpo_ray.scoring.viclip import TINY_VICLIP_CONFIG, ViCLIP, load_viclip, tokenize

PROMPTS = ["a cat sitting on a sofa", "a red car driving through a city at night, cinematic lighting"]


@pytest.fixture(scope="module")
def tiny_viclip() -> ViCLIP:
    return oc.tiny_model().eval()


def gradient_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, height, width, 3))
    shift = np.arange(num_frames)[:, None, None, None] * 7
    return ((base + shift) % 256).astype(np.uint8)


def test_real_config_has_the_released_viclip_layout() -> None:
    with torch.device("meta"):
        state = ViCLIP().state_dict()
    # shapes derived by hand from InternVid viclip_vision.clip_joint_l14 / viclip_text.clip_text_l14 (context 32)
    expected = {
        "vision_encoder.conv1.weight": (1024, 3, 1, 14, 14),
        "vision_encoder.class_embedding": (1024,),
        "vision_encoder.positional_embedding": (257, 1024),
        "vision_encoder.temporal_positional_embedding": (1, 8, 1024),
        "vision_encoder.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "vision_encoder.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
        "vision_encoder.ln_post.bias": (1024,),
        "vision_encoder.proj": (1024, 768),
        "text_encoder.token_embedding.weight": (49408, 768),
        "text_encoder.positional_embedding": (32, 768),
        "text_encoder.transformer.resblocks.11.attn.out_proj.weight": (768, 768),
        "text_encoder.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072),
        "text_encoder.ln_final.weight": (768,),
        "text_encoder.text_projection": (768, 768),
        "temp": (),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    # vision: 6 + 24 blocks x 12 + ln_post (2) + proj; text: 12 blocks x 12 + 5; temp
    assert len(state) == (6 + 24 * 12 + 3) + (12 * 12 + 5) + 1
    assert not any("attn_mask" in key for key in state)


def test_load_viclip_round_trips_the_original_checkpoint_layout(tmp_path, tiny_viclip: ViCLIP) -> None:
    path = tmp_path / "ViClip-InternVid-10M-FLT.pth"
    torch.save({"model": tiny_viclip.state_dict()}, path)
    loaded = load_viclip(str(path), TINY_VICLIP_CONFIG)
    for key, value in tiny_viclip.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape", "no_model_entry"])
def test_load_viclip_rejects_a_mismatching_checkpoint(tmp_path, tiny_viclip: ViCLIP, defect: str) -> None:
    state = dict(tiny_viclip.state_dict())
    checkpoint = {"model": state}
    if defect == "missing":
        del state["text_encoder.text_projection"]
        needle = "missing keys.*text_encoder.text_projection"
    elif defect == "unexpected":
        state["vision_encoder.head.weight"] = torch.zeros(1)
        needle = "unexpected keys.*vision_encoder.head.weight"
    elif defect == "shape":
        state["vision_encoder.temporal_positional_embedding"] = torch.zeros(1, 4, 32)
        needle = "vision_encoder.temporal_positional_embedding"
    else:
        checkpoint, needle = state, "no 'model' entry"
    path = tmp_path / "viclip.pth"
    torch.save(checkpoint, path)
    with pytest.raises(WeightsError, match=needle):
        load_viclip(str(path), TINY_VICLIP_CONFIG)


def test_middle_sampling_indices_are_exact() -> None:
    assert oc.frame_indices(16) == [0, 2, 4, 6, 8, 10, 12, 14]
    # linspace(0, 20, 9) -> 0 2 5 7 10 12 15 17 20; (start + end - 1) // 2
    assert oc.frame_indices(20) == [0, 3, 5, 8, 10, 13, 15, 18]
    assert oc.frame_indices(5) == [0, 1, 2, 3, 4, 4, 4, 4]  # VBench pads with the last frame


def test_tokenizer_is_clip_bpe_with_context_32() -> None:
    tokens = tokenize(["a cat", "word " * 40], context_length=32)
    assert tokens.shape == (2, 32)
    assert tokens[0, :4].tolist() == [49406, 320, 2368, 49407] and tokens[0, 4:].eq(0).all()
    assert tokens[1, 0] == 49406 and tokens[1, 31] == 49407 and tokens[1].ne(0).all()  # cut, end token kept


def test_overall_consistency_is_the_cosine_of_independently_computed_embeddings(tiny_viclip: ViCLIP) -> None:
    size = TINY_VICLIP_CONFIG.vision.input_resolution
    vbench_clip_transform = T.Compose([  # VBench's clip_transform applied to uint8 frames (T, 3, H, W)
        T.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=False),
        T.CenterCrop(size),
        T.Lambda(lambda x: x.float().div(255.0)),
        T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])
    videos = [gradient_video(16, 36, 50, seed=0), gradient_video(5, 60, 44, seed=1)]
    indices = [[0, 2, 4, 6, 8, 10, 12, 14], [0, 1, 2, 3, 4, 4, 4, 4]]
    expected = []
    with torch.no_grad():
        for frames, index, prompt in zip(videos, indices, PROMPTS):
            pixels = vbench_clip_transform(torch.from_numpy(frames[index]).permute(0, 3, 1, 2))
            video = tiny_viclip.vision_encoder(pixels.permute(1, 0, 2, 3)[None])  # (1, 3, T, H, W)
            text = tiny_viclip.text_encoder(open_clip_tokenize([prompt], context_length=32))
            expected.append(F.cosine_similarity(video, text).item())
    assert oc.score_batch(videos, tiny_viclip, PROMPTS) == pytest.approx(expected, abs=1e-6)
    assert [oc.score(v, tiny_viclip, p) for v, p in zip(videos, PROMPTS)] == pytest.approx(expected, abs=1e-6)
    assert all(np.isfinite(expected)) and len(set(expected)) == 2


def test_tiny_model_outputs_are_finite_and_registry_loads_it() -> None:
    model = load_scorer_model("overall_consistency", ModelSpec(tiny=True))
    assert isinstance(model, ViCLIP) and not model.training
    video = torch.randn(2, 8, 3, 28, 28)
    assert torch.isfinite(model.encode_vision(video)).all()
    assert torch.isfinite(model.encode_text(tokenize(PROMPTS, 32))).all()


def test_overall_consistency_needs_a_prompt_per_video(tiny_viclip: ViCLIP) -> None:
    with pytest.raises(ValueError, match="one prompt per video"):
        oc.score(gradient_video(8, 28, 28, seed=0), tiny_viclip)
