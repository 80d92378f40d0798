"""Diffusion-DPO loss against a hand-written float64 reference (plain loops, independent of the implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from videodpo_ray.dpo import diffusion_dpo_loss


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sample_mse(pred: np.ndarray, target: np.ndarray) -> float:
    total, count = 0.0, 0
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        total += (p - t) ** 2
        count += 1
    return total / count


def reference_dpo(model, ref, target, weights, beta):
    """Loop-based loss and metrics for a stacked [winners..., losers...] batch."""
    num_pairs = model.shape[0] // 2
    terms, insides = [], []
    errors = {"model_win": [], "model_lose": [], "ref_win": [], "ref_lose": []}
    for k in range(num_pairs):
        mw, ml = _sample_mse(model[k], target[k]), _sample_mse(model[k + num_pairs], target[k + num_pairs])
        rw, rl = _sample_mse(ref[k], target[k]), _sample_mse(ref[k + num_pairs], target[k + num_pairs])
        pair_beta = beta[k] if isinstance(beta, list) else beta  # a list: one beta per pair
        inside = -0.5 * pair_beta * ((mw - ml) - (rw - rl))
        insides.append(inside)
        terms.append(-weights[k] * _logsigmoid(inside))
        for key, value in zip(errors, (mw, ml, rw, rl)):
            errors[key].append(value)
    return {
        "insides": insides,
        "loss": sum(terms) / num_pairs,
        "implicit_accuracy": sum(1 for x in insides if x > 0) / num_pairs,
        "reward_margin": sum(insides) / num_pairs,
        "model_mse_win": sum(errors["model_win"]) / num_pairs,
        "model_mse_lose": sum(errors["model_lose"]) / num_pairs,
        "ref_mse_win": sum(errors["ref_win"]) / num_pairs,
        "ref_mse_lose": sum(errors["ref_lose"]) / num_pairs,
        "mean_weight": sum(weights) / num_pairs,
    }


def _ddpm_batch(rng: np.random.Generator, shape, prediction: str):
    """Latents x0, noise e, timestep alphas for a stacked batch; target e (epsilon) or v."""
    x0 = rng.standard_normal(shape)
    noise = rng.standard_normal(shape)
    alphas_cumprod = rng.uniform(0.05, 0.95, size=shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    if prediction == "epsilon":
        return noise
    return np.sqrt(alphas_cumprod) * noise - np.sqrt(1 - alphas_cumprod) * x0


def _as_tensors(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("beta", [50.0, 5000.0])
def test_loss_and_metrics_match_float64_reference(prediction, beta):
    rng = np.random.default_rng(0 if prediction == "epsilon" else 2)
    shape = (6, 4, 3, 2, 5)  # 3 pairs, (C, T, H, W) latents
    target = _ddpm_batch(rng, shape, prediction)
    scale = 0.3 if beta == 50.0 else 0.03  # keep inside in the non-saturated range for both betas
    model = target + scale * rng.standard_normal(shape)
    ref = target + scale * rng.standard_normal(shape)
    weights = [0.5, 1.7, 2.0]
    expected = reference_dpo(model, ref, target, weights, beta)
    assert all(0.01 < abs(x) < 20 for x in expected.pop("insides"))  # non-trivial: neither zero nor saturated

    model_t, ref_t, target_t = _as_tensors(model, ref, target)
    out = diffusion_dpo_loss(model_t, ref_t, target_t, torch.tensor(weights, dtype=torch.float64), beta_dpo=beta)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-12, abs=1e-12)
    for key, value in expected.items():
        if key != "loss":
            assert float(out.metrics[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert 0.0 <= float(out.metrics["implicit_accuracy"]) <= 1.0


def test_implicit_accuracy_is_fraction_of_positive_pairs():
    target = torch.zeros(8, 3, dtype=torch.float64)
    ref = torch.ones(8, 3, dtype=torch.float64)  # d_ref = 0
    model = ref.clone()
    model[0] = 0.5  # pair 0: winner better than reference -> inside > 0
    model[1] = 0.5  # pair 1: same
    model[6] = 0.5  # pair 2: loser improved -> inside < 0
    out = diffusion_dpo_loss(model, ref, target, beta_dpo=1.0)  # pair 3: unchanged -> inside = 0, not counted
    assert float(out.metrics["implicit_accuracy"]) == 0.5


@pytest.mark.parametrize("reduction", ["mean", "videodpo_reference"])
def test_loss_is_ln2_times_mean_weight_when_policy_equals_reference(reduction):
    generator = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 2, 3, 4, 5, generator=generator)
    target = torch.randn(4, 2, 3, 4, 5, generator=generator)
    weights = torch.tensor([0.5, 2.5])
    out = diffusion_dpo_loss(pred, pred.clone(), target, weights, beta_dpo=5000.0, reduction=reduction)
    assert out.loss.item() == pytest.approx(math.log(2) * 1.5, rel=1e-6)
    assert float(out.metrics["reward_margin"]) == 0.0
    assert float(out.metrics["implicit_accuracy"]) == 0.0
    assert float(out.metrics["mean_weight"]) == pytest.approx(1.5)
    unweighted = diffusion_dpo_loss(pred, pred.clone(), target, beta_dpo=5000.0, reduction=reduction)
    assert unweighted.loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_gradient_sign_lowering_winner_error_lowers_loss():
    generator = torch.Generator().manual_seed(4)
    target = torch.randn(4, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    delta = torch.randn(4, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    ref = target + 0.05 * torch.randn(4, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    win_scale = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    lose_scale = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    scales = torch.stack([win_scale, win_scale, lose_scale, lose_scale]).reshape(4, 1, 1, 1, 1)
    out = diffusion_dpo_loss(target + scales * delta, ref, target, beta_dpo=500.0)
    out.loss.backward()
    assert win_scale.grad > 0  # a larger winner error raises the loss
    assert lose_scale.grad < 0  # a larger loser error lowers it

    def loss_at(win: float) -> float:
        s = torch.tensor([win, win, 0.05, 0.05], dtype=torch.float64).reshape(4, 1, 1, 1, 1)
        return diffusion_dpo_loss(target + s * delta, ref, target, beta_dpo=500.0).loss.item()

    assert loss_at(0.04) < loss_at(0.05) < loss_at(0.06)


def test_reference_is_treated_as_constant():
    pred = torch.randn(2, 3, 4)
    ref = pred.clone().requires_grad_(True)
    model = pred.clone().requires_grad_(True)
    out = diffusion_dpo_loss(model, ref, torch.randn(2, 3, 4), beta_dpo=10.0)
    out.loss.backward()
    assert ref.grad is None and model.grad is not None
    assert all(not value.requires_grad for value in out.metrics.values())


def test_videodpo_reference_reduction_reproduces_width_column_quirk():
    rng = np.random.default_rng(7)
    C, T, H, W = 4, 2, 3, 5
    target = rng.standard_normal((2, C, T, H, W))
    model = target + 0.05 * rng.standard_normal((2, C, T, H, W))
    ref = target + 0.05 * rng.standard_normal((2, C, T, H, W))
    weight, beta = 1.5, 5000.0

    column_terms, positive_columns = [], 0
    for w in range(W):  # hand computation: one DPO term per width column, mean over (C, T, H)
        mw = _sample_mse(model[0, :, :, :, w], target[0, :, :, :, w])
        ml = _sample_mse(model[1, :, :, :, w], target[1, :, :, :, w])
        rw = _sample_mse(ref[0, :, :, :, w], target[0, :, :, :, w])
        rl = _sample_mse(ref[1, :, :, :, w], target[1, :, :, :, w])
        inside = -0.5 * beta * ((mw - ml) - (rw - rl))
        positive_columns += inside > 0
        column_terms.append(-weight * _logsigmoid(inside))
    expected_loss = sum(column_terms) / W
    assert 1 < positive_columns < W  # the logged "accuracy" is a column count, not a fraction

    model_t, ref_t, target_t = _as_tensors(model, ref, target)
    weights = torch.tensor([weight], dtype=torch.float64)
    out = diffusion_dpo_loss(model_t, ref_t, target_t, weights, beta_dpo=beta, reduction="videodpo_reference")
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert float(out.metrics["implicit_accuracy"]) == positive_columns
    proper = diffusion_dpo_loss(model_t, ref_t, target_t, weights, beta_dpo=beta)
    expected_proper = reference_dpo(model, ref, target, [weight], beta)["loss"]
    assert proper.loss.item() == pytest.approx(expected_proper, rel=1e-12)
    assert abs(proper.loss.item() - expected_loss) > 1e-3  # the quirk really changes the loss


def test_low_precision_predictions_are_reduced_in_float32():
    pred = torch.randn(4, 8, dtype=torch.bfloat16)
    out = diffusion_dpo_loss(pred, pred.clone(), torch.zeros(4, 8, dtype=torch.bfloat16), beta_dpo=5000.0)
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize(
    "shapes, weights, reduction, message",
    [
        (((4, 3), (4, 3), (4, 2)), None, "mean", "same shape"),
        (((3, 3), (3, 3), (3, 3)), None, "mean", "stacked"),
        (((4, 3), (4, 3), (4, 3)), torch.ones(3), "mean", "one per pair"),
        (((4, 3, 2, 2), (4, 3, 2, 2), (4, 3, 2, 2)), None, "videodpo_reference", "(2B, C, T, H, W)"),
        (((4, 3), (4, 3), (4, 3)), None, "sum", "unknown reduction"),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, weights, reduction, message):
    model, ref, target = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        diffusion_dpo_loss(model, ref, target, weights, beta_dpo=1.0, reduction=reduction)


# --- Flow-DPO: constant vs timestep-scaled beta ---------------------------------------------------------------------
def _flow_target(rng: np.random.Generator, shape):
    """A stacked flow-matching target: the velocity eps - x0, one eps per pair (winner and loser share it)."""
    x0 = rng.standard_normal(shape)
    eps = np.concatenate([rng.standard_normal((shape[0] // 2, *shape[1:]))] * 2)
    return eps - x0


@pytest.mark.parametrize("beta_schedule", ["constant", "timestep_scaled"])
def test_flow_dpo_matches_float64_reference(beta_schedule):
    rng = np.random.default_rng(11)
    shape = (6, 4, 3, 2, 5)
    noise_levels = [0.05, 0.4, 0.7]
    target = _flow_target(rng, shape)
    model = target + 0.2 * rng.standard_normal(shape)
    ref = target + 0.2 * rng.standard_normal(shape)
    weights, beta = [0.5, 1.7, 2.0], 100.0
    betas = [beta * (1 - s) ** 2 for s in noise_levels] if beta_schedule == "timestep_scaled" else beta
    expected = reference_dpo(model, ref, target, weights, betas)
    assert all(0.01 < abs(x) < 20 for x in expected.pop("insides")), beta_schedule

    model_t, ref_t, target_t = _as_tensors(model, ref, target)
    levels = torch.tensor(noise_levels, dtype=torch.float64) if beta_schedule == "timestep_scaled" else None
    out = diffusion_dpo_loss(model_t, ref_t, target_t, torch.tensor(weights, dtype=torch.float64), beta_dpo=beta,
                             beta_schedule=beta_schedule, noise_levels=levels)
    assert out.loss.item() == pytest.approx(expected["loss"], rel=1e-12, abs=1e-12)
    for key, value in expected.items():
        if key != "loss":
            assert float(out.metrics[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), key
    other = reference_dpo(model, ref, target, weights, beta if beta_schedule == "timestep_scaled" else
                          [beta * (1 - s) ** 2 for s in noise_levels])["loss"]
    assert abs(other - expected["loss"]) > 1e-3  # the two schedules really differ on this batch


@pytest.mark.parametrize("reduction", ["mean", "videodpo_reference"])
def test_timestep_scaled_beta_is_ln2_times_mean_weight_at_init(reduction):
    generator = torch.Generator().manual_seed(5)
    pred = torch.randn(4, 2, 3, 4, 5, generator=generator)
    target = torch.randn(4, 2, 3, 4, 5, generator=generator)
    out = diffusion_dpo_loss(pred, pred.clone(), target, torch.tensor([0.5, 2.5]), beta_dpo=100.0, reduction=reduction,
                             beta_schedule="timestep_scaled", noise_levels=torch.tensor([0.2, 0.7]))
    assert out.loss.item() == pytest.approx(math.log(2) * 1.5, rel=1e-6)
    assert float(out.metrics["reward_margin"]) == 0.0


def test_timestep_scaled_beta_per_pair_and_per_width_column():
    """beta (1 - s)^2: s = 0 is the constant beta, s = 1 switches the pair off (ln 2, no gradient); in the
    reproduction reduction each pair's beta applies to all of its width columns."""
    generator = torch.Generator().manual_seed(6)
    target = torch.randn(2, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    ref = target + 0.05 * torch.randn(target.shape, generator=generator, dtype=torch.float64)
    model = (target + 0.05 * torch.randn(target.shape, generator=generator, dtype=torch.float64)).requires_grad_()
    for reduction in ("mean", "videodpo_reference"):
        constant = diffusion_dpo_loss(model, ref, target, beta_dpo=400.0, reduction=reduction)
        at_zero = diffusion_dpo_loss(model, ref, target, beta_dpo=400.0, reduction=reduction,
                                     beta_schedule="timestep_scaled", noise_levels=torch.tensor([0.0]))
        at_half = diffusion_dpo_loss(model, ref, target, beta_dpo=1600.0, reduction=reduction,
                                     beta_schedule="timestep_scaled", noise_levels=torch.tensor([0.5]))
        assert at_zero.loss.item() == constant.loss.item() == pytest.approx(at_half.loss.item(), rel=1e-12)
        assert constant.loss.item() != pytest.approx(math.log(2), rel=1e-3)
        at_one = diffusion_dpo_loss(model, ref, target, beta_dpo=400.0, reduction=reduction,
                                    beta_schedule="timestep_scaled", noise_levels=torch.tensor([1.0]))
        assert at_one.loss.item() == pytest.approx(math.log(2), rel=1e-12)
        (gradient,) = torch.autograd.grad(at_one.loss, model)
        assert gradient.abs().max() == 0.0


def test_timestep_scaled_gradient_sign():
    generator = torch.Generator().manual_seed(4)
    target = torch.randn(4, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    delta = torch.randn(4, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    ref = target + 0.05 * torch.randn(4, 2, 3, 4, 5, generator=generator, dtype=torch.float64)
    win_scale = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    lose_scale = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    scales = torch.stack([win_scale, win_scale, lose_scale, lose_scale]).reshape(4, 1, 1, 1, 1)
    out = diffusion_dpo_loss(target + scales * delta, ref, target, beta_dpo=500.0, beta_schedule="timestep_scaled",
                             noise_levels=torch.tensor([0.3, 0.8]))
    out.loss.backward()
    assert win_scale.grad > 0 and lose_scale.grad < 0


@pytest.mark.parametrize(
    "schedule, levels, message",
    [
        ("timestep_scaled", None, r"needs noise_levels of shape \(2,\), got None"),
        ("timestep_scaled", torch.tensor([0.5]), r"needs noise_levels of shape \(2,\), got \(1,\)"),
        ("timestep_scaled", torch.tensor([0.5, 1.5]), r"must lie in \[0, 1\]"),
        ("timestep_scaled", torch.tensor([-0.1, 0.5]), r"must lie in \[0, 1\]"),
        ("constant", torch.tensor([0.5, 0.5]), "only used by beta_schedule='timestep_scaled'"),
        ("linear", torch.tensor([0.5, 0.5]), "unknown beta_schedule 'linear'"),
    ],
)
def test_bad_beta_schedule_inputs_raise(schedule, levels, message):
    pred = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=message):
        diffusion_dpo_loss(pred, pred, pred, beta_dpo=1.0, beta_schedule=schedule, noise_levels=levels)
