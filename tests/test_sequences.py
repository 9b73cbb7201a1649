"""The Markov-chain task: its entropy rate against closed forms and against the sampled sequences."""

import numpy as np
import pytest

from gradlab import sequences
from gradlab.errors import ConfigError


def binary_entropy(p):
    return -p * np.log(p) - (1 - p) * np.log(1 - p)


@pytest.mark.parametrize(("a", "b"), [(0.1, 0.3), (0.5, 0.5), (0.02, 0.9)])
def test_two_state_entropy_rate_closed_form(a, b):
    """P = [[1-a, a], [b, 1-b]]: pi = (b, a) / (a + b), H = (b h(a) + a h(b)) / (a + b)."""
    chain = sequences.Chain(2, 1, np.array([[1 - a, a], [b, 1 - b]]))
    np.testing.assert_allclose(sequences.stationary(chain), np.array([b, a]) / (a + b), rtol=1e-10)
    expected = (b * binary_entropy(a) + a * binary_entropy(b)) / (a + b)
    assert sequences.entropy_rate(chain) == pytest.approx(expected, rel=1e-10)


def test_deterministic_cycle_has_zero_entropy_and_uniform_tokens():
    v = 5
    chain = sequences.Chain(v, 1, np.roll(np.eye(v), 1, axis=1))  # a -> a + 1
    assert sequences.entropy_rate(chain) == pytest.approx(0.0, abs=1e-12)
    assert sequences.unigram_entropy(chain) == pytest.approx(np.log(v), rel=1e-10)


def test_random_chain_is_sparse_and_normalised():
    chain = sequences.random_chain(vocab=6, order=2, branching=3, seed=4)
    assert chain.transition.shape == (36, 6)
    np.testing.assert_allclose(chain.transition.sum(axis=1), 1.0)
    assert np.all((chain.transition > 0).sum(axis=1) == 3)
    newest = np.arange(36) % 6
    assert np.all(chain.transition[np.arange(36), (newest + 1) % 6] > 0)  # the forced successor


def test_sampled_sequences_reach_the_entropy_rate():
    """The mean of -ln P(x_t | context) over sampled tokens estimates H (law of large numbers), and the
    token frequencies at the first position match the stationary marginal: sequences start stationary."""
    chain = sequences.random_chain(vocab=5, order=2, branching=3, seed=1)
    tokens = sequences.sample(chain, sequences=4000, length=40, seed=2).astype(int)
    context = tokens[:, :-2] * 5 + tokens[:, 1:-1]
    nll = -np.log(chain.transition[context, tokens[:, 2:]])
    h = sequences.entropy_rate(chain)
    assert abs(nll.mean() - h) < 5 * nll.std() / np.sqrt(nll.size / 40)  # generous: tokens of a row correlate
    assert abs(nll.mean() - h) < 0.02
    marginal = sequences.stationary(chain).reshape(5, 5).sum(axis=1)  # oldest token of the starting context
    counts = np.bincount(tokens[:, 0], minlength=5) / len(tokens)
    np.testing.assert_allclose(counts, marginal, atol=4 * np.sqrt(0.25 / len(tokens)))


def test_make_masks_targets_without_a_full_context():
    cfg = sequences.SequenceConfig(vocab=4, order=3, branching=2, seq_len=6, sequences=8, batch_size=4)
    task = sequences.make(cfg)
    assert task.tokens.shape == (8, 7)
    np.testing.assert_array_equal(task.target_mask, [0, 0, 1, 1, 1, 1])  # target t + 1 follows tokens 0..t


@pytest.mark.parametrize(
    ("change", "key"),
    [({"branching": 20}, "data.branching"), ({"order": 4}, "data.order"), ({"batch_size": 10**5}, "data.batch_size")],
)
def test_bad_values_are_refused_with_their_key(change, key):
    with pytest.raises(ConfigError) as caught:
        sequences.SequenceConfig(**change).validate()
    assert caught.value.key == key
