"""Synthetic token sequences from a seed: a random sparse Markov chain with a known entropy rate.

The next token depends on the previous `order` tokens: each context (a tuple of `order` tokens, V**order
of them) has `branching` possible successors drawn without replacement, with Dirichlet(1) weights. The
successor list of context (..., a) always holds (a + 1) mod V, so every context reaches every other one
and the context chain is irreducible: it has one stationary distribution pi. Sequences start from pi, so
every position is stationary and a predictor that knows the chain reaches, on every target past the
first `order` tokens, the entropy rate

    H = -sum_c pi(c) sum_x P(x | c) ln P(x | c)   (nats per token; Cover & Thomas 2006, Thm 4.2.4),

the best achievable cross-entropy. With order >= 2 the next token needs earlier positions than the
current one: a transformer has to attend to learn it. Everything is numpy at trial-build time; the pool
of sequences is a constant of the compiled program, batches are slices of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gradlab.config import param
from gradlab.errors import ConfigError

MAX_CONTEXTS = 4096  # vocab**order: the chain's transition table is (contexts, vocab)


@dataclass(frozen=True)
class SequenceConfig:
    """A random sparse Markov chain over a small vocabulary and the pool of sequences sampled from it."""

    vocab: int = param(16, low=2, doc="tokens")
    order: int = param(2, low=1, doc="the next token depends on this many previous ones")
    branching: int = param(3, low=1, doc="possible successors of each context (<= vocab)")
    seq_len: int = param(32, low=2, doc="tokens a sequence feeds the model (targets: the next token at each)")
    sequences: int = param(4096, low=1, doc="sequences in the pool batches are drawn from")
    batch_size: int = param(32, low=1, doc="sequences per step (<= sequences)")
    seed: int = param(0, low=0, doc="fixes the chain and the pool; the run's seed axis varies the init")

    def validate(self) -> None:
        if self.branching > self.vocab:
            raise ConfigError(f"must be <= data.vocab={self.vocab}, got {self.branching}", key="data.branching")
        if self.vocab**self.order > MAX_CONTEXTS:
            raise ConfigError(
                f"vocab**order must be <= {MAX_CONTEXTS}, got {self.vocab}**{self.order}", key="data.order"
            )
        if self.order >= self.seq_len:
            raise ConfigError(f"must be < data.seq_len={self.seq_len}, got {self.order}", key="data.order")
        if self.batch_size > self.sequences:
            raise ConfigError(
                f"must be <= data.sequences={self.sequences}, got {self.batch_size}", key="data.batch_size"
            )


class Chain(NamedTuple):
    """A Markov chain on contexts of `order` tokens; context index = sum_i token_i V^(order-1-i)."""

    vocab: int
    order: int
    transition: np.ndarray  # (contexts, vocab): P(next token | context)


def random_chain(vocab: int, order: int, branching: int, seed: int) -> Chain:
    """The sparse chain of the module docstring, from a numpy seed."""
    rng = np.random.default_rng(seed)
    contexts = vocab**order
    transition = np.zeros((contexts, vocab))
    for c in range(contexts):
        forced = (c % vocab + 1) % vocab  # successor of the last token: irreducibility
        others = rng.permutation(np.delete(np.arange(vocab), forced))[: branching - 1]
        successors = np.concatenate([[forced], others])
        transition[c, successors] = rng.dirichlet(np.ones(branching))
    return Chain(vocab, order, transition)


def context_matrix(chain: Chain) -> np.ndarray:
    """The chain as a first-order chain on contexts: (contexts, contexts), rows summing to 1."""
    contexts = chain.vocab**chain.order
    shift = (np.arange(contexts) * chain.vocab) % contexts  # drop the oldest token, make room for the next
    q = np.zeros((contexts, contexts))
    for x in range(chain.vocab):
        q[np.arange(contexts), shift + x] += chain.transition[:, x]
    return q


def stationary(chain: Chain) -> np.ndarray:
    """pi with pi Q = pi, sum pi = 1 over contexts: the least-squares solution of the stacked system."""
    q = context_matrix(chain)
    n = q.shape[0]
    a = np.vstack([q.T - np.eye(n), np.ones((1, n))])
    b = np.concatenate([np.zeros(n), [1.0]])
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()


def entropy_rate(chain: Chain) -> float:
    """H = -sum_c pi(c) sum_x P(x|c) ln P(x|c), nats per token: the best achievable loss."""
    p = chain.transition
    with np.errstate(divide="ignore", invalid="ignore"):
        per_context = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(stationary(chain) @ per_context)


def sample(chain: Chain, sequences: int, length: int, seed: int) -> np.ndarray:
    """(sequences, length) int32 tokens, each sequence started from the stationary distribution."""
    rng = np.random.default_rng(seed)
    v, k = chain.vocab, chain.order
    start = rng.choice(v**k, size=sequences, p=stationary(chain))
    tokens = np.zeros((sequences, length), np.int64)
    for i in range(k):  # the starting context's tokens, oldest first
        tokens[:, i] = (start // v ** (k - 1 - i)) % v
    context = start
    cumulative = np.cumsum(chain.transition, axis=1)
    for t in range(k, length):
        u = rng.random(sequences)
        nxt = np.minimum((u[:, None] > cumulative[context]).sum(axis=1), v - 1)
        tokens[:, t] = nxt
        context = (context * v) % v**k + nxt
    return tokens.astype(np.int32)


class Task(NamedTuple):
    chain: Chain
    tokens: np.ndarray  # (sequences, seq_len + 1): inputs are [:, :-1], targets [:, 1:]
    entropy_rate: float
    target_mask: np.ndarray  # (seq_len,) float32: 1 where the target follows a full context (t + 1 >= order)


def make(cfg: SequenceConfig) -> Task:
    """The config's chain and its pool of sequences (the pool's seed is derived from the chain's)."""
    chain = random_chain(cfg.vocab, cfg.order, cfg.branching, cfg.seed)
    tokens = sample(chain, cfg.sequences, cfg.seq_len + 1, cfg.seed + 1)
    mask = (np.arange(cfg.seq_len) + 1 >= cfg.order).astype(np.float32)
    return Task(chain, tokens, entropy_rate(chain), mask)


def unigram_entropy(chain: Chain) -> float:
    """Entropy of the stationary token distribution: the loss of the best predictor ignoring context."""
    pi = stationary(chain).reshape(-1, chain.vocab).sum(axis=0)  # marginal of the newest token
    pi = pi[pi > 0]
    return float(-np.sum(pi * np.log(pi)))
