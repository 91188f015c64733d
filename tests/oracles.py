"""Straightforward oracles shared by the tests: full SVD of the full matrix and explicit
commutator products, in numpy float64, and a small model pair with structured updates."""

from __future__ import annotations

import numpy as np
import torch

from fusion_bench_larv.core import veneer
from fusion_bench_larv.core.diagnostics import singular_values
from fusion_bench_larv.core.layers import group_layers

SHAPES = [(12, 12), (40, 9), (9, 40), (33, 16)]


# -- the straightforward formulas ------------------------------------------------------------------
def naive_reff(a: np.ndarray) -> float:
    s = np.linalg.svd(a, compute_uv=False)
    p = s**2 / np.sum(a * a)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def naive_conflict(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
    den = np.linalg.norm(x) * np.linalg.norm(y) + eps
    if x.shape[0] == x.shape[1]:
        return float(np.linalg.norm(x @ y - y @ x) / den)
    left = np.linalg.norm(x @ y.T - y @ x.T)  # the m×m product, formed
    right = np.linalg.norm(x.T @ y - y.T @ x)  # the n×n product, formed
    return float(0.5 * left / den + 0.5 * right / den)


def structured(shape, rng, rank=3, noise=0.05):
    m, n = shape
    return rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) + noise * rng.normal(size=shape)


# -- a model pair and per-matrix naive layer diagnostics ----------------------------------------
def make_pair(num_layers=4, seed=0):
    rng = np.random.default_rng(seed)
    theta0, merged = {"embed.weight": torch.randn(10, 8)}, {}
    for i in range(num_layers):
        for name, shape in (("q", (8, 8)), ("k", (8, 8)), ("fc1", (24, 8)), ("fc2", (8, 24))):
            theta0[f"layers.{i}.{name}.weight"] = torch.tensor(rng.normal(size=shape)).float()
        theta0[f"layers.{i}.conv.weight"] = torch.tensor(rng.normal(size=(6, 2, 2, 2))).float()
        theta0[f"layers.{i}.fc1.bias"] = torch.zeros(24)
    for k, v in theta0.items():
        d = structured(v.reshape(v.shape[0], -1).shape, rng, rank=2, noise=0.1 + 0.1 * len(k) % 3)
        merged[k] = v + 0.02 * torch.tensor(d).float().reshape(v.shape)
    return theta0, merged


def naive_layers(theta0, merged, settings, exact_delta=False):
    names = [k for k, v in theta0.items() if v.is_floating_point()]
    groups = group_layers(names, settings.layer_pattern)
    e_l, c_l = [], []
    for members in groups.members:
        e_v, c_v = [], []
        for k in members:
            if theta0[k].ndim < 2:
                continue
            x = theta0[k].double().reshape(theta0[k].shape[0], -1).numpy()
            if exact_delta:  # float64 models: Δ in float64
                y = (merged[k].double() - theta0[k].double()).reshape(x.shape).numpy()
            else:  # LARV forms Δ of a float32 model in float32
                y = (merged[k].float() - theta0[k].float()).double().reshape(x.shape).numpy()
            if settings.spectrum == "exact":
                r0, rd = naive_reff(x), naive_reff(y)
            else:  # the literal single-matrix path: one generator, θ_0's sketch first, then Δ's
                g = torch.Generator().manual_seed(veneer._matrix_seed(settings.seed, k))
                s0 = singular_values(torch.tensor(x), "randomized", settings.rank, 10, g).numpy()
                sd = singular_values(torch.tensor(y), "randomized", settings.rank, 10, g).numpy()
                p0, pd = s0**2 / np.sum(x * x), sd**2 / np.sum(y * y)
                if settings.spectrum_tail == "uniform":  # the residual as d equal eigenvalues
                    d = min(x.shape) - len(s0)
                    p0 = np.concatenate([p0, np.full(d, (1 - p0.sum()) / d)])
                    pd = np.concatenate([pd, np.full(d, (1 - pd.sum()) / d)])
                r0, rd = np.exp(-(p0 * np.log(p0)).sum()), np.exp(-(pd * np.log(pd)).sum())
            e_v.append(r0 / (rd + settings.eps))
            c_v.append(naive_conflict(x, y, settings.eps))
        e_l.append(float(np.mean(e_v)))
        c_l.append(float(np.mean(c_v)))
    return e_l, c_l
