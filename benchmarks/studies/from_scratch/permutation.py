"""Carrier-permutation test: does marking with carrier l push the suspect towards class l?

A test of radioactivity read in the suspect's own output or feature space, with
no alignment and an exact null.

1. Take a pool of P vanilla images that were never released (e.g. test images
   of every class) and mark a copy of the whole pool with each carrier u_l,
   l = 1..K, with the same marking procedure and per-image seeds. The marked
   pool for carrier l is a function of u_l and the pool only, not of class l.
2. Response matrix M (K x K): M[k, l] = mean over the pool of the change of
   the suspect's class-k score when the pool is marked with u_l (black-box:
   log-softmax of class k; white-box: cosine between classifier row w_k and
   the mean feature shift).
3. Statistic S = sum_k M[k, k]. Under H0 (the suspect is independent of the
   key: it never saw data marked with it) the carriers are i.i.d. and
   independent of the suspect, so their assignment to classes is
   exchangeable: S has the law of sum_k M[k, pi(k)] for a uniformly random
   permutation pi. The p-value is the share of the K! permutations with a
   statistic at least S (exact; enumerated for K <= 10, else Monte Carlo
   with the +1 correction, valid as well). Its smallest value is 1/K!
   (2.8e-7 for K = 10).

Research code of the from-scratch study (moved out of the package: it has no CLI and its power was
not measured); used by carrier_permutation.py and class_pattern.py, tested by test_permutation.py here
(``.venv/bin/pytest -q benchmarks/studies/from_scratch/test_permutation.py``, not part of the suite).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from radioactive.marking import MarkingConfig, image_generator, mark_batch
from radioactive.networks import FeatureNetwork


def permutation_log10_pvalue(m: np.ndarray, max_exact: int = 10, samples: int = 200_000, seed: int = 0) -> float:
    """log10 P(sum_k M[k, pi(k)] >= trace(M)) for a uniform random permutation pi.

    Args:
        m: (K, K) response matrix, rows = classes, columns = carriers.
        max_exact: enumerate all K! permutations when K <= this.
        samples: Monte Carlo permutations otherwise (p = (1 + #{>=}) / (1 + samples)).

    Returns:
        log10 p-value in [log10(1/K!), 0].
    """
    m = np.asarray(m, dtype=np.float64)
    k = m.shape[0]
    s = np.trace(m)
    tol = 1e-12 * (1 + abs(s))
    if k <= max_exact:
        count = 0
        total = 0
        for block in _perm_blocks(k):
            vals = m[np.arange(k), block].sum(1)
            count += int((vals >= s - tol).sum())
            total += len(block)
        return math.log10(count / total)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((samples, k)), axis=1)
    vals = m[np.arange(k), perms].sum(1)
    return math.log10((1 + int((vals >= s - tol).sum())) / (1 + samples))


def _perm_blocks(k: int, block: int = 500_000):
    it = itertools.permutations(range(k))
    while True:
        chunk = list(itertools.islice(it, block))
        if not chunk:
            return
        yield np.asarray(chunk, dtype=np.int64)


def marked_pools(net: FeatureNetwork, pool: torch.Tensor, carriers: torch.Tensor, config: MarkingConfig,
                 seed: int = 0) -> list[torch.Tensor]:
    """Mark the whole pool once per carrier.

    Args:
        net: the marking network (eval mode).
        pool: (P, 3, H, W) uint8 vanilla images.
        carriers: (K, D) carriers.

    Returns:
        K tensors (P, 3, H, W) uint8: the pool marked with carrier l.
    """
    out = []
    for l in range(carriers.shape[0]):
        gens = [image_generator(seed, f"pool-{j}-{l}") for j in range(len(pool))]
        marked = []
        for s in range(0, len(pool), config.batch_size):
            sl = slice(s, s + config.batch_size)
            u = carriers[l].expand(len(pool[sl]), -1)
            marked.append(mark_batch(net, pool[sl], u, config, gens[sl]))
        out.append(torch.cat(marked))
    return out


@torch.no_grad()
def response_matrices(suspect: FeatureNetwork, pool: torch.Tensor, pools: list[torch.Tensor],
                      class_index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Black-box and white-box response matrices.

    Args:
        suspect: the suspect (features + classifier).
        pool: (P, 3, H, W) uint8 vanilla pool; pools: its K marked copies (key order).
        class_index: for key class k, the suspect's output index.

    Returns:
        (M_black, M_white), each (K, K): M_black[k, l] = mean change of log-softmax of class k when the pool is
        marked with carrier l; M_white[k, l] = cos(w_k, mean feature shift under carrier l).
    """
    suspect.eval()
    f0, z0 = suspect.features_and_logits(pool.float() / 255)
    lp0 = torch.log_softmax(z0.double(), 1)[:, class_index]
    w = suspect.classifier.weight.double()[class_index]
    kk = len(pools)
    black, white = np.zeros((kk, kk)), np.zeros((kk, kk))
    for l, marked in enumerate(pools):
        f, z = suspect.features_and_logits(marked.float() / 255)
        black[:, l] = (torch.log_softmax(z.double(), 1)[:, class_index] - lp0).mean(0).numpy()
        shift = (f.double() - f0.double()).mean(0)
        white[:, l] = (w @ shift / (w.norm(dim=1) * shift.norm() + 1e-30)).numpy()
    return black, white
