"""dpo_step / sft_step wiring on a tiny VideoDiffusionModel test double (real families are tested by their owners)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from videodpo_ray.config import build_config
from videodpo_ray.dpo import diffusion_dpo_loss
from videodpo_ray.errors import ConfigError
from videodpo_ray.models import ModelConfig
from videodpo_ray.models.base import VideoDiffusionModel
from videodpo_ray.training.config import DPOConfig
from videodpo_ray.training.step import DPOObjective, dpo_step, sft_step

CHANNELS, FRAMES, HEIGHT, WIDTH, TEXT_DIM = 2, 3, 4, 4, 6


class TinyEpsilonModel(VideoDiffusionModel):
    """A 1x1x1 conv denoiser with a text bias, a frozen copy as reference, and a DDPM schedule."""

    family = "vc2"
    prediction_type = "epsilon"
    latent_layout = "B, C, T, H, W"
    text_shape = (4, TEXT_DIM)  # unchecked: predict below takes any length

    def __init__(self) -> None:
        super().__init__(ModelConfig(family=self.family))
        torch.manual_seed(0)
        self.denoiser = nn.Conv3d(CHANNELS, CHANNELS, 1)
        self.text_proj = nn.Linear(TEXT_DIM, CHANNELS)
        self.reference_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.reference_text_proj = copy.deepcopy(self.text_proj).requires_grad_(False)
        self.register_buffer("alphas_cumprod", torch.linspace(0.999, 0.01, 1000, dtype=torch.float64).float())
        self.calls: list[dict] = []

    def _alphas(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()

    def sample_timesteps(self, batch_size, generator=None):
        return torch.randint(0, 1000, (batch_size,), generator=generator)

    def add_noise(self, latents, noise, timesteps):
        self.calls.append({"op": "add_noise", "latents": latents, "noise": noise, "timesteps": timesteps})
        sqrt_a, sqrt_1ma = self._alphas(timesteps)
        return sqrt_a * latents + sqrt_1ma * noise

    def training_target(self, latents, noise, timesteps):
        return noise

    def predict(self, noisy_latents, timesteps, text_embeddings, *, reference=False):
        self.calls.append(
            {
                "op": "predict",
                "noisy": noisy_latents,
                "timesteps": timesteps,
                "text": text_embeddings,
                "reference": reference,
                "grad_enabled": torch.is_grad_enabled(),
            }
        )
        denoiser = self.reference_denoiser if reference else self.denoiser
        text_proj = self.reference_text_proj if reference else self.text_proj
        bias = text_proj(text_embeddings.mean(dim=1)).reshape(-1, CHANNELS, 1, 1, 1)
        return denoiser(noisy_latents) + bias + timesteps.reshape(-1, 1, 1, 1, 1) / 1000

    def trainable_parameters(self):
        return [*self.denoiser.parameters(), *self.text_proj.parameters()]

    # Not used by the training step.
    def encode_prompts(self, prompts):
        raise NotImplementedError

    def encode_videos(self, videos, generator=None):
        raise NotImplementedError

    def decode_latents(self, latents):
        raise NotImplementedError

    def latent_shape(self, num_frames, height, width):
        raise NotImplementedError

    def denoise(self, noise, text_embeddings, generators, **kwargs):
        raise NotImplementedError

    def run_denoiser(self, denoiser, noisy_latents, timesteps, text_embeddings):  # predict above is the whole model
        raise NotImplementedError

    def trainable_state_dict(self):
        raise NotImplementedError

    def load_trainable_state_dict(self, state_dict):
        raise NotImplementedError

    def write_pretrained(self, directory):
        raise NotImplementedError

    @classmethod
    def tiny(cls, config=None):
        return cls()

    @classmethod
    def from_config(cls, config):
        return cls()


class TinyVelocityModel(TinyEpsilonModel):
    family = "cogvideox"
    prediction_type = "v_prediction"

    def training_target(self, latents, noise, timesteps):
        sqrt_a, sqrt_1ma = self._alphas(timesteps)
        return sqrt_a * noise - sqrt_1ma * latents


def _pair_batch(num_pairs: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    shape = (num_pairs, CHANNELS, FRAMES, HEIGHT, WIDTH)
    win = torch.randn(shape, generator=generator)
    lose = torch.randn(shape, generator=generator)
    text = torch.randn(num_pairs, 5, TEXT_DIM, generator=generator)
    return win, lose, text


def _perturb_policy(model: TinyEpsilonModel) -> None:
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))


def test_one_timestep_and_one_noise_per_pair_shared_by_winner_and_loser():
    model = TinyEpsilonModel()
    win, lose, text = _pair_batch(num_pairs=3)
    dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
    (noising,) = [call for call in model.calls if call["op"] == "add_noise"]
    assert torch.equal(noising["latents"], torch.cat([win, lose]))  # [winners..., losers...]
    assert torch.equal(noising["noise"][:3], noising["noise"][3:])
    assert torch.equal(noising["timesteps"][:3], noising["timesteps"][3:])
    assert len(set(noising["timesteps"][:3].tolist())) == 3  # but different pairs get different draws
    assert not torch.equal(noising["noise"][0], noising["noise"][1])
    policy, reference = sorted((c for c in model.calls if c["op"] == "predict"), key=lambda c: c["reference"])
    assert not policy["reference"] and reference["reference"]
    assert policy["grad_enabled"] and not reference["grad_enabled"]
    for call in (policy, reference):
        assert torch.equal(call["text"], torch.cat([text, text]))
        assert torch.equal(call["timesteps"], noising["timesteps"])
        assert torch.equal(call["noisy"], policy["noisy"])


def test_independent_draws_reproduction_switch():
    model = TinyEpsilonModel()
    win, lose, text = _pair_batch(num_pairs=2)
    dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0),
             shared_noise=False)
    (noising,) = [call for call in model.calls if call["op"] == "add_noise"]
    assert noising["timesteps"].shape == (4,)
    assert not torch.equal(noising["timesteps"][:2], noising["timesteps"][2:])
    assert not torch.equal(noising["noise"][:2], noising["noise"][2:])


@pytest.mark.parametrize("shared_noise", [True, False])
def test_seeded_generator_makes_the_step_deterministic(shared_noise):
    model = TinyEpsilonModel()
    _perturb_policy(model)
    win, lose, text = _pair_batch()

    def run(seed: int):
        return dpo_step(model, win, lose, text, torch.tensor([1.0, 2.0]), beta_dpo=5000.0,
                        generator=torch.Generator().manual_seed(seed), shared_noise=shared_noise)

    first, second, other = run(11), run(11), run(12)
    assert first.loss.item() == second.loss.item()
    assert {k: float(v) for k, v in first.metrics.items()} == {k: float(v) for k, v in second.metrics.items()}
    assert first.loss.item() != other.loss.item()


@pytest.mark.parametrize("shared_noise", [True, False])
def test_one_generator_per_pair_draws_each_pair_as_a_micro_batch_of_it_alone(shared_noise):
    """What keeps `data.pairs_per_worker: auto` from changing a step: 3 pairs packed in one micro-batch, each with
    its own generator, train on exactly the timesteps and noise of 3 one-pair micro-batches, and give their mean
    loss."""
    model = TinyEpsilonModel()
    _perturb_policy(model)
    win, lose, text = _pair_batch(num_pairs=3)
    weights = torch.tensor([1.0, 2.0, 0.5])

    def seeded(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    packed = dpo_step(model, win, lose, text, weights, beta_dpo=5000.0, generator=seeded([7, 8, 9]),
                      shared_noise=shared_noise)
    (packed_noising,) = [call for call in model.calls if call["op"] == "add_noise"]
    alone = []
    for index, seed in enumerate([7, 8, 9]):
        model.calls.clear()
        one = slice(index, index + 1)
        alone.append(dpo_step(model, win[one], lose[one], text[one], weights[one], beta_dpo=5000.0,
                              generator=torch.Generator().manual_seed(seed), shared_noise=shared_noise))
        (noising,) = [call for call in model.calls if call["op"] == "add_noise"]
        for rows, packed_rows in ((0, index), (1, 3 + index)):  # winner row, loser row
            assert torch.equal(noising["timesteps"][rows], packed_noising["timesteps"][packed_rows])
            assert torch.equal(noising["noise"][rows], packed_noising["noise"][packed_rows])
    assert packed.loss.item() == pytest.approx(sum(step.loss.item() for step in alone) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="2 generators for 3 pairs"):
        dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=seeded([1, 2]))


@pytest.mark.parametrize("model_class", [TinyEpsilonModel, TinyVelocityModel])
def test_loss_is_ln2_at_initialisation(model_class):
    model = model_class()
    win, lose, text = _pair_batch()
    generator = torch.Generator().manual_seed(0)
    out = dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=generator)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    weighted = dpo_step(model, win, lose, text, torch.tensor([1.0, 3.0]), beta_dpo=5000.0, generator=generator)
    assert weighted.loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    assert float(weighted.metrics["reward_margin"]) == 0.0


@pytest.mark.parametrize("model_class", [TinyEpsilonModel, TinyVelocityModel])
def test_step_feeds_the_family_target_to_the_loss(model_class):
    model = model_class()
    _perturb_policy(model)
    win, lose, text = _pair_batch()
    out = dpo_step(model, win, lose, text, torch.tensor([0.5, 1.5]), beta_dpo=5000.0,
                   generator=torch.Generator().manual_seed(3))
    (noising,) = [call for call in model.calls if call["op"] == "add_noise"]
    latents, noise, timesteps = noising["latents"], noising["noise"], noising["timesteps"]
    sqrt_a, sqrt_1ma = model._alphas(timesteps)
    target = noise if model.prediction_type == "epsilon" else sqrt_a * noise - sqrt_1ma * latents
    noisy = sqrt_a * latents + sqrt_1ma * noise
    embeddings = torch.cat([text, text])
    with torch.no_grad():
        expected = diffusion_dpo_loss(
            model.predict(noisy, timesteps, embeddings),
            model.predict(noisy, timesteps, embeddings, reference=True),
            target,
            torch.tensor([0.5, 1.5]),
            beta_dpo=5000.0,
        )
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert float(out.metrics["timestep"]) == pytest.approx(timesteps.float().mean().item())
    assert out.loss.item() != pytest.approx(math.log(2) * 1.0, rel=1e-3)  # the policy really differs


def test_gradients_reach_only_the_policy_and_training_lowers_the_loss():
    model = TinyEpsilonModel()
    win, lose, text = _pair_batch(num_pairs=1)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    losses, accuracies = [], []
    for _ in range(10):
        out = dpo_step(model, win, lose, text, None, beta_dpo=5000.0, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for p in model.reference_denoiser.parameters())
        optimizer.step()
        losses.append(out.loss.item())
        accuracies.append(float(out.metrics["implicit_accuracy"]))
    assert losses[0] == pytest.approx(math.log(2), rel=1e-6)
    assert losses[-1] < 0.5 * losses[0]
    assert accuracies[-1] == 1.0


def test_sft_step_is_plain_diffusion_mse():
    model = TinyVelocityModel()
    latents, _, text = _pair_batch(num_pairs=3)
    out = sft_step(model, latents, text, generator=torch.Generator().manual_seed(2))
    (noising,) = [call for call in model.calls if call["op"] == "add_noise"]
    (policy,) = [call for call in model.calls if call["op"] == "predict"]
    assert not policy["reference"]
    assert torch.equal(noising["latents"], latents)
    target = model.training_target(latents, noising["noise"], noising["timesteps"])
    with torch.no_grad():
        pred = model.predict(policy["noisy"], policy["timesteps"], text)
    assert out.loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)
    assert float(out.metrics["mse"]) == pytest.approx(out.loss.item())
    again = sft_step(model, latents, text, generator=torch.Generator().manual_seed(2))
    assert again.loss.item() == out.loss.item()
    out.loss.backward()
    assert model.denoiser.weight.grad is not None


def test_mismatched_inputs_raise():
    model = TinyEpsilonModel()
    win, lose, text = _pair_batch(num_pairs=2)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="differ in shape"):
        dpo_step(model, win, lose[:1], text, None, beta_dpo=1.0, generator=generator)
    with pytest.raises(ValueError, match="one per pair"):
        dpo_step(model, win, lose, text[:1], None, beta_dpo=1.0, generator=generator)
    with pytest.raises(ValueError, match="expected 2"):
        sft_step(model, win, text[:1], generator=generator)


class TinyFlowModel(TinyEpsilonModel):
    """The test double as a flow-matching family: x_t = (1 - s) x0 + s eps with s = t / 1000, target eps - x0."""

    family = "wan"
    prediction_type = "flow_prediction"

    def noise_level(self, timesteps):
        return timesteps.to(torch.float32) / 1000

    def add_noise(self, latents, noise, timesteps):
        self.calls.append({"op": "add_noise", "latents": latents, "noise": noise, "timesteps": timesteps})
        s = self.noise_level(timesteps).reshape(-1, 1, 1, 1, 1)
        return (1 - s) * latents + s * noise

    def training_target(self, latents, noise, timesteps):
        return noise - latents


@pytest.mark.parametrize("beta_schedule", ["constant", "timestep_scaled"])
def test_flow_dpo_step_feeds_the_pair_noise_levels_to_the_loss(beta_schedule):
    model = TinyFlowModel()
    _perturb_policy(model)
    win, lose, text = _pair_batch(num_pairs=3)
    weights = torch.tensor([0.5, 1.5, 1.0])
    out = dpo_step(model, win, lose, text, weights, beta_dpo=100.0, generator=torch.Generator().manual_seed(3),
                   beta_schedule=beta_schedule)
    (noising,) = [call for call in model.calls if call["op"] == "add_noise"]
    latents, noise, timesteps = noising["latents"], noising["noise"], noising["timesteps"]
    s = (timesteps.double() / 1000).reshape(-1, 1, 1, 1, 1)
    noisy = ((1 - s) * latents.double() + s * noise.double()).float()
    embeddings = torch.cat([text, text])
    with torch.no_grad():
        policy = model.predict(noisy, timesteps, embeddings)
        reference = model.predict(noisy, timesteps, embeddings, reference=True)
    target = noise - latents
    levels = timesteps[:3].double() / 1000
    for schedule, expected_levels in (("constant", None), ("timestep_scaled", levels)):
        expected = diffusion_dpo_loss(policy, reference, target, weights, beta_dpo=100.0, beta_schedule=schedule,
                                      noise_levels=expected_levels)
        if schedule == beta_schedule:
            assert out.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
        else:
            assert out.loss.item() != pytest.approx(expected.loss.item(), rel=1e-3)


def test_timestep_scaled_beta_is_refused_where_it_has_no_meaning():
    win, lose, text = _pair_batch()
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="needs a flow-matching family, not 'vc2'"):
        dpo_step(TinyEpsilonModel(), win, lose, text, None, beta_dpo=1.0, generator=generator,
                 beta_schedule="timestep_scaled")
    with pytest.raises(ConfigError, match="needs dpo.shared_noise=true"):
        dpo_step(TinyFlowModel(), win, lose, text, None, beta_dpo=1.0, generator=generator, shared_noise=False,
                 beta_schedule="timestep_scaled")
    with pytest.raises(ConfigError, match="needs a flow-matching family, not 'vc2'"):
        DPOObjective(TinyEpsilonModel(), DPOConfig(beta_schedule="timestep_scaled"))
    message = r"dpo: invalid config\n  <root>: Value error, beta_schedule='timestep_scaled' needs shared_noise=true"
    with pytest.raises(ConfigError, match=message):
        build_config(DPOConfig, {"beta_schedule": "timestep_scaled", "shared_noise": False}, source="dpo")


def test_dpo_objective_passes_the_beta_schedule():
    model = TinyFlowModel()
    _perturb_policy(model)
    win, lose, text = _pair_batch()
    config = build_config(DPOConfig, {"beta_dpo": 100.0, "beta_schedule": "timestep_scaled"})
    assert DPOConfig().beta_schedule == "constant"
    loss, _ = DPOObjective(model, config)(win, lose, text, torch.ones(2), torch.Generator().manual_seed(4))
    expected = dpo_step(model, win, lose, text, torch.ones(2), beta_dpo=100.0, beta_schedule="timestep_scaled",
                        generator=torch.Generator().manual_seed(4))
    constant = dpo_step(model, win, lose, text, torch.ones(2), beta_dpo=100.0,
                        generator=torch.Generator().manual_seed(4))
    assert loss.item() == expected.loss.item() != constant.loss.item()
