"""The reward model: Bradley-Terry loss, the 10% noise model, the batched ensemble, and fitting a
known reward from its preferences."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from proximal.losses import bradley_terry_loss, preference_probability
from proximal.reward_model import RewardEnsemble, RewardModel, rank_correlation


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("return_1,return_2,label,error_rate", [
    (2.0, 0.0, 1.0, 0.0), (2.0, 0.0, 0.0, 0.0), (-1.5, 0.5, 0.5, 0.0),
    (2.0, 0.0, 1.0, 0.1), (3.0, 4.0, 0.0, 0.1), (0.3, -0.2, 0.5, 0.1),
])
def test_bradley_terry_loss_matches_the_hand_computed_cross_entropy(return_1, return_2, label, error_rate):
    # Eq. 1: exp(R1) / (exp(R1) + exp(R2)), mixed with a uniform answer of probability error_rate.
    p1_plain = math.exp(return_1) / (math.exp(return_1) + math.exp(return_2))
    p1 = (1 - error_rate) * p1_plain + error_rate / 2
    expected = -(label * math.log(p1) + (1 - label) * math.log(1 - p1))
    loss = bradley_terry_loss(torch.tensor([return_1]), torch.tensor([return_2]), torch.tensor([label]), error_rate)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_value_for_one_case():
    # R1 - R2 = 2, clip 1 preferred, no noise: -log sigmoid(2) = log(1 + e^-2) = 0.126928...
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.0)
    assert loss.item() == pytest.approx(0.1269280110429725, rel=1e-6)


def test_noise_model_bounds_the_probabilities_and_is_symmetric():
    differences = torch.tensor([-1e4, -10.0, -1.0, 0.0, 1.0, 10.0, 1e4])
    p = preference_probability(differences, torch.zeros(7), error_rate=0.1)
    assert p[0].item() == pytest.approx(0.05) and p[-1].item() == pytest.approx(0.95)  # never certain
    assert p[3].item() == 0.5
    assert torch.allclose(p + preference_probability(torch.zeros(7), differences, 0.1), torch.ones(7))
    assert p[4].item() == pytest.approx(0.9 * sigmoid(1.0) + 0.05)
    # A confidently wrong prediction costs at most -log(0.05) with the noise model, unboundedly without.
    wrong = bradley_terry_loss(torch.tensor([1e4]), torch.tensor([0.0]), torch.tensor([0.0]), 0.1)
    assert wrong.item() == pytest.approx(-math.log(0.05), rel=1e-5)
    plain = bradley_terry_loss(torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([0.0]), 0.0)
    assert plain.item() == pytest.approx(100.0, rel=1e-4) and math.isfinite(plain.item())


def test_ensemble_members_are_independent_mlps():
    torch.manual_seed(0)
    ensemble = RewardEnsemble(input_dim=5, num_members=3, hidden_sizes=(8, 8), input_clip=10.0)
    inputs = torch.randn(3, 10, 5)
    out = ensemble(inputs)  # [E, B]
    for member in range(3):  # reference: the same weights as ordinary nn.Linear layers
        layers = []
        for layer, (weight, bias) in enumerate(zip(ensemble.weights, ensemble.biases)):
            linear = nn.Linear(weight.shape[1], weight.shape[2])
            linear.weight.data, linear.bias.data = weight[member].T.clone(), bias[member, 0].clone()
            layers += [linear] + ([nn.LeakyReLU(0.01)] if layer < len(ensemble.weights) - 1 else [])
        reference = nn.Sequential(*layers)(inputs[member]).squeeze(-1)
        assert torch.allclose(out[member], reference, atol=1e-6)
    # A gradient through member 0's output reaches member 0's weights only.
    ensemble(inputs)[0].sum().backward()
    assert ensemble.weights[0].grad[1:].abs().sum() == 0 and ensemble.weights[0].grad[0].abs().sum() > 0


def test_rank_correlation_against_hand_cases():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(x, x ** 3) == pytest.approx(1.0)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    # ties get their average rank: y ranks [0.5, 0.5, 2, 3] against x ranks [0, 1, 2, 3]
    y = np.array([5.0, 5.0, 6.0, 7.0])
    assert rank_correlation(x, y) == pytest.approx(np.corrcoef([0, 1, 2, 3], [0.5, 0.5, 2, 3])[0, 1])


def test_a_model_fitted_to_preferences_of_a_known_linear_reward_recovers_its_ordering():
    rng = np.random.default_rng(0)
    dim, length, pairs = 4, 10, 600
    weights = np.array([1.0, -2.0, 0.5, 0.0])  # the true reward r(x) = w . x

    def clips(count):
        return torch.from_numpy(rng.normal(size=(count, length, dim)).astype(np.float32))

    clips_1, clips_2 = clips(pairs), clips(pairs)
    true_1, true_2 = (clips_1.numpy() @ weights).sum(-1), (clips_2.numpy() @ weights).sum(-1)
    labels = torch.from_numpy((true_1 > true_2).astype(np.float32))
    is_validation = torch.from_numpy(rng.random(pairs) < 0.3)
    torch.manual_seed(0)
    model = RewardModel(dim, num_members=3, hidden_sizes=(64, 64), learning_rate=1e-3, error_rate=0.1,
                        reward_std=1.0, input_clip=10.0)
    stats = model.fit(clips_1, clips_2, labels, is_validation, steps=600, minibatch_size=64,
                      generator=torch.Generator().manual_seed(0))
    assert stats["reward_val_accuracy"] > 0.85
    fresh = clips(300)  # clips never seen in training
    learned = model.reward(fresh.flatten(0, 1)).reshape(300, length).sum(-1).numpy()
    assert rank_correlation(learned, (fresh.numpy() @ weights).sum(-1)) >= 0.9
    # The reward handed to PPO is normalised: zero mean and reward_std over the labelled steps.
    all_steps = torch.cat([clips_1, clips_2]).flatten(0, 1)
    per_member = (model.network(all_steps.expand(3, -1, -1)) - model.output_mean[:, None]) / model.output_std[:, None]
    assert per_member.mean(1).abs().max() < 1e-4 and torch.allclose(per_member.std(1), torch.ones(3), atol=1e-4)


class ScriptedLosses(RewardModel):
    """A reward model whose training and validation losses are given, to test the L2 rule alone."""

    def __init__(self, train_losses, val_losses):
        super().__init__(2, num_members=3, hidden_sizes=(4,), learning_rate=1e-3, error_rate=0.1, reward_std=1.0,
                         input_clip=10.0)
        self.scripted = [torch.tensor(train_losses), torch.tensor(val_losses)]

    def _losses(self, clips_1, clips_2, labels):
        return self.scripted.pop(0)


def test_l2_keeps_validation_loss_between_1_1_and_1_5_times_training_loss():
    model = ScriptedLosses(train_losses=[1.0, 1.0, 1.0], val_losses=[2.0, 1.2, 1.05])
    before = model.l2.clone()
    clips = torch.randn(6, 3, 2)
    model.fit(clips, clips, torch.ones(6), torch.tensor([True, False] * 3), steps=0, minibatch_size=2,
              generator=torch.Generator().manual_seed(0))
    factor = RewardModel.L2_FACTOR
    # ratio 2.0: overfitting, more L2; 1.2: inside the band, unchanged; 1.05: less L2
    assert torch.allclose(model.l2, before * torch.tensor([factor, 1.0, 1 / factor]))


@pytest.mark.parametrize("input_clip", [None, 10.0])
def test_inputs_far_outside_the_first_data_are_clipped_only_when_asked(input_clip):
    """The standardisation comes from the initial policy's data; a later, faster policy's states
    can lie many of its standard deviations away (HalfCheetah's forward velocity passed 10 of
    them at 1.8 m/s). Without a clip they still move the reward; with one they saturate."""
    ensemble = RewardEnsemble(input_dim=1, num_members=1, hidden_sizes=(4,), input_clip=input_clip)
    with torch.no_grad():  # all-positive weights: the output grows linearly with a positive input
        for weight, bias in zip(ensemble.weights, ensemble.biases):
            weight.fill_(0.5)
            bias.zero_()
        ensemble.input_std.fill_(0.2)
        low, middle, high = ensemble(torch.tensor([[[2.0], [4.0], [6.0]]]))[0].tolist()  # 10, 20, 30 stds
    if input_clip is None:
        assert middle > low and high - middle == pytest.approx(middle - low)
    else:
        assert low == middle == high
