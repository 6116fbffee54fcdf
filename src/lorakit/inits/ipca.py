"""Incremental PCA over batches of layer inputs, as EVA uses it (PEFT's ``IncrementalPCA`` with
``lowrank=True``, itself scikit-learn's algorithm; Ross et al., 2008).

A batch ``X`` (n, d) updates the running mean and variance, then the components from the SVD of

    [ diag(S_prev)·components_prev ;  X - mean(X) ;  √(n_prev·n/(n_prev+n))·(mean_prev - mean(X)) ]

computed with ``torch.svd_lowrank(·, q=2k, niter=4)`` under a fixed seed (42), signs fixed so that each
component's largest entry is positive. ``explained_variance_ratio_`` is ``S² / Σ var·n``.
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """``partial_fit`` on batches; ``components_`` (k, d), ``singular_values_`` (k,),
    ``explained_variance_ratio_`` (k,) after the first batch.

    Args:
        n_components: k.
        seed: seed of the randomized SVD (PEFT's EVA: 42), drawn in a forked RNG so that the
            caller's random state is untouched.
    """

    def __init__(self, n_components: int, seed: int = 42, niter: int = 4) -> None:
        self.n_components = n_components
        self.q = 2 * n_components
        self.seed, self.niter = seed, niter
        self.n_samples_seen_ = None
        self.mean_ = self.var_ = None

    @property
    def fitted(self) -> bool:
        return hasattr(self, "components_")

    def _svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            U, S, V = torch.svd_lowrank(X, q=self.q, niter=self.niter)
        return U, S, V.mH

    @staticmethod
    def _mean_var(X, last_mean, last_var, last_n):
        new_n = torch.tensor([X.shape[0]], device=X.device)
        n = last_n + new_n
        last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device) if last_mean is None \
            else last_mean * last_n
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / n
        T = new_sum / new_n
        temp = X - T
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        temp.square_()
        new_unnorm = temp.sum(dim=0, dtype=torch.float64)
        new_unnorm -= correction / new_n
        if last_var is None:
            var = new_unnorm / n
        else:
            last_over_new = last_n.double() / new_n
            var = (last_var * last_n + new_unnorm
                   + last_over_new / n * (last_sum / last_over_new - new_sum).square()) / n
        return mean, var, n

    @staticmethod
    def _svd_flip(u, v):
        signs = torch.sign(v[range(v.shape[0]), torch.argmax(torch.abs(v), dim=1)])
        u *= signs[: u.shape[1]].view(1, -1)
        v *= signs.view(-1, 1)
        return u, v

    def partial_fit(self, X: torch.Tensor) -> IncrementalPCA:
        """Update with one batch ``X`` (n, d), n >= k (checked by the caller). ``X`` is copied."""
        X = X.clone()
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        n_samples = X.shape[0]
        first = not self.fitted
        if first:
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
        mean, var, n_total = self._mean_var(X, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            X -= mean
        else:
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / n_total) * n_samples)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X,
                              factor * (self.mean_ - batch_mean)))
        U, S, Vt = self._svd(X)
        U, Vt = self._svd_flip(U, Vt)
        k = self.n_components
        self.n_samples_seen_ = n_total
        self.components_ = Vt[:k]  # (k, d)
        self.singular_values_ = S[:k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (S**2 / torch.sum(var * n_total))[:k]
        return self
