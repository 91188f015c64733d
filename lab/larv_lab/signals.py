"""Which data-free per-layer signal tracks what data-using methods learn? (issue 21, item 7;
analysis only, no new default.)

For one testbed build and its benchmark cells, per transformer block ℓ = 1..L:

- the learned profiles: layer-wise AdaMerging's λ_t,ℓ (``merging_weights.pt``: one λ per task and
  parameter tensor; a block's λ is the mean over its tensors), and LiNeS's tuned λ_ℓ = α + β·ℓ/(L−1)
  (``lines_layers.json`` of the ``lines-val`` cell over Task Arithmetic);
- the data-free signals: depth ℓ; LARV's e_ℓ and c_ℓ (``larv_layers.json`` of Task Arithmetic +
  LARV tiered); ‖Δ_ℓ‖_F / ‖θ_0,ℓ‖_F of the merged update Δ = Σ_t τ_t (any global coefficient cancels
  in the ranks); the mean pairwise cosine of the task vectors' blocks; the sign conflict
  1 − mean_j |Σ_t sign τ_t,j| / T over the block's entries (a seeded sample of 50,000 of them).

Spearman's ρ across the L blocks between each learned profile (AdaMerging's averaged over tasks;
the per-block scales fitted on validation labels, the ceiling, when its cell exists) and each
signal, with two readings of its uncertainty:

- a 95% percentile interval from resampling the tasks with replacement (B resamples;
  AdaMerging's task-mean profile and every task-vector signal recomputed on each resample; e_ℓ,
  c_ℓ and depth come from the full merge and stay fixed);
- a permutation test over the blocks: one profile's ranks permuted across the blocks, every
  permutation up to 8 blocks, N seeded random ones beyond (p = (1 + #{|ρ_π| ≥ |ρ|}) / (1 + N)).
  Its power is the table's limit: with L blocks only |ρ| ≥ ρ_crit(L), the least c with
  P(|ρ_π| ≥ c) ≤ 5% (:func:`critical_rho`), can be told from no correlation (L = 12: ≈ 0.59). A ρ inside that band is "no detectable correlation at
  this power", not evidence of none.

LiNeS's profile is one line in depth, so its ρ with a signal is depth's (or undefined when β = 0).

    python -m larv_lab.signals --out lab/results/testbed_regime --suites bench-testbed-full bench-testbed-full_seed1

``--rerender`` recomputes the permutation tests from the committed ``signals.json`` (profiles and
signals are stored there) without the testbed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fusion_bench_larv.core.layers import group_layers

SIGNALS = ("depth", "e", "c", "update_norm", "cosine", "sign_conflict")
SIGNAL_LABELS = {
    "depth": "depth ℓ",
    "e": "LARV e_ℓ (effective-rank contrast)",
    "c": "LARV c_ℓ (commutator conflict)",
    "update_norm": "‖Δ_ℓ‖ / ‖θ_0,ℓ‖ (merged update)",
    "cosine": "mean pairwise cosine of τ_t,ℓ",
    "sign_conflict": "sign conflict of τ_t,ℓ",
}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the ranks (average ranks for ties); NaN when
    either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


#: random permutations of the blocks per test (seeded): p resolves to about 1 / PERMUTATIONS
PERMUTATIONS = 20_000
#: the test's level (two-sided)
ALPHA = 0.05


def _rank_corr_rows(ra: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Pearson's correlation of the fixed ranks ``ra`` (L,) with each row of ``perms`` (N, L)."""
    a = ra - ra.mean()
    b = perms - perms.mean(axis=1, keepdims=True)
    return (b @ a) / (np.linalg.norm(b, axis=1) * np.linalg.norm(a))


#: up to this many blocks the tests enumerate every permutation (8! = 40,320), beyond it they draw
#: :data:`PERMUTATIONS` at random
EXACT_UP_TO = 8


def _permutations(values: np.ndarray, permutations: int, seed: int) -> np.ndarray:
    """Every permutation of ``values`` (len ≤ :data:`EXACT_UP_TO`) or ``permutations`` seeded
    random ones, as rows."""
    if len(values) <= EXACT_UP_TO:
        from itertools import permutations as all_orders

        return values[np.array(list(all_orders(range(len(values)))))]
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(values) for _ in range(permutations)])


def permutation_p(a: Sequence[float], b: Sequence[float], permutations: int = PERMUTATIONS,
                  seed: int = 0) -> float:  # fmt: skip
    """Two-sided permutation p-value of Spearman's ρ(a, b) over the blocks, b's ranks permuted:
    exact (#{|ρ_π| ≥ |ρ|} / L!) up to :data:`EXACT_UP_TO` blocks, else (1 + #{|ρ_π| ≥ |ρ|}) /
    (1 + N) over N random permutations; NaN when ρ is undefined."""
    from scipy.stats import rankdata

    rho = spearman(a, b)
    if not np.isfinite(rho):
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    perms = _permutations(rb, permutations, seed)
    hits = int(np.sum(np.abs(_rank_corr_rows(ra, perms)) >= abs(rho) - 1e-9))
    if len(rb) <= EXACT_UP_TO:
        return hits / len(perms)
    return (1 + hits) / (1 + len(perms))


def critical_rho(num_blocks: int, alpha: float = ALPHA, permutations: int = PERMUTATIONS,
                 seed: int = 0) -> float:  # fmt: skip
    """The smallest |ρ| a two-sided permutation test at level α tells from no correlation over
    ``num_blocks`` blocks without ties: the least c with P(|ρ_π| ≥ c) ≤ α under random
    permutations π of the ranks 1..L (L = 5: 1.0, since P(|ρ| = 1) = 2/120; L = 12: ≈ 0.59, the
    tabulated Spearman critical value); inf when no |ρ| is significant (L ≤ 4)."""
    ranks = np.arange(1, num_blocks + 1, dtype=float)
    null = np.sort(np.abs(_rank_corr_rows(ranks, _permutations(ranks, permutations, seed))))
    values = np.unique(np.round(null, 9))
    tail = 1.0 - np.searchsorted(null, values - 1e-9) / len(null)  # P(|ρ_π| ≥ v)
    ok = values[tail <= alpha]
    return float(ok.min()) if len(ok) else float("inf")


#: entries per block the sign conflict is read on (a seeded sample: the bootstrap recomputes it)
SIGN_SAMPLE = 50_000


def block_task_stats(
    theta0: Mapping[str, torch.Tensor], taus: Sequence[Mapping[str, torch.Tensor]], members
) -> dict[str, np.ndarray]:
    """Per block ℓ the statistics the task-vector signals are computed from: ``dot`` (T, T, L)
    = ⟨τ_s,ℓ, τ_t,ℓ⟩ over every entry; ``signs``, per block a (T, n) matrix of sign τ_t on a
    seeded sample of at most :data:`SIGN_SAMPLE` entries; ``theta0_sq`` (L,) = ‖θ_0,ℓ‖²."""
    T, L = len(taus), len(members)
    dot = np.zeros((T, T, L))
    signs, theta0_sq = [], np.zeros(L)
    g = torch.Generator().manual_seed(0)
    for ell, names in enumerate(members):
        flat = torch.stack(
            [torch.cat([tau[n].double().reshape(-1) for n in names]) for tau in taus]
        )
        dot[:, :, ell] = (flat @ flat.T).numpy()
        cols = torch.randperm(flat.shape[1], generator=g)[:SIGN_SAMPLE]
        signs.append(torch.sign(flat[:, cols]).to(torch.int8).numpy())
        theta0_sq[ell] = sum(float(theta0[n].double().pow(2).sum()) for n in names)
    return {"dot": dot, "signs": signs, "theta0_sq": theta0_sq}


def task_vector_signals(stats: Mapping, tasks: Sequence[int]) -> dict[str, np.ndarray]:
    """The three task-vector signals per block for a (re)sample of task indices (repeats allowed)."""
    idx = np.asarray(tasks)
    dot = stats["dot"][np.ix_(idx, idx)]  # (T', T', L)
    L = dot.shape[2]
    # ‖Σ_t τ_t,ℓ‖² = Σ_s Σ_t ⟨τ_s, τ_t⟩
    update = np.sqrt(dot.sum(axis=(0, 1)) / stats["theta0_sq"])
    norms = np.sqrt(np.stack([np.diag(dot[:, :, ell]) for ell in range(L)], axis=1))  # (T', L)
    cos = np.zeros(L)
    n = len(idx)
    for ell in range(L):
        c = dot[:, :, ell] / np.outer(norms[:, ell], norms[:, ell])
        off = [c[i, j] for i in range(n) for j in range(n) if i < j and idx[i] != idx[j]]
        cos[ell] = float(np.mean(off)) if off else float("nan")
    conflict = np.array(
        [1.0 - np.abs(s[idx].astype(np.int64).sum(0)).mean() / n for s in stats["signs"]]
    )
    return {"update_norm": update, "cosine": cos, "sign_conflict": conflict}


def adamerging_block_profile(
    weights: torch.Tensor, param_names: Sequence[str], members
) -> np.ndarray:
    """(T, L): each task's λ averaged over the parameter tensors of each block."""
    col = {n: i for i, n in enumerate(param_names)}
    w = weights.double().numpy()
    return np.stack(
        [w[:, [col[n] for n in names if n in col]].mean(axis=1) for names in members], axis=1
    )


def correlations(suite_dir: Path, testbed, resamples: int = 2000, seed: int = 0) -> dict:
    """Every learned profile against every signal for one suite's cells (see module doc)."""
    pre = testbed.load_pretrained()
    theta0 = {k: v.detach() for k, v in pre.state_dict().items()}
    trainable = [n for n, p in pre.named_parameters() if p.requires_grad]
    tasks = list(testbed.tasks)
    taus = []
    for t in tasks:
        sd = testbed.load_finetuned(t).state_dict()
        taus.append(
            {k: sd[k].detach() - theta0[k] for k in theta0 if theta0[k].is_floating_point()}
        )
    groups = group_layers([k for k in taus[0]])
    members = groups.members
    L = len(members)
    stats = block_task_stats(theta0, taus, members)
    layers = json.loads((suite_dir / "ta" / "larv-tiered" / "larv_layers.json").read_text())
    recs = sorted(layers["layers"], key=lambda r: r["index"])
    fixed = {
        "depth": np.arange(1, L + 1, dtype=float),
        "e": np.array([r["e"] for r in recs]),
        "c": np.array([r["c"] for r in recs]),
    }
    profiles: dict[str, np.ndarray] = {}
    ada = suite_dir / "testbed_adamerging" / "base" / "merging_weights.pt"
    ada_tasks = None
    if ada.is_file():
        ada_tasks = adamerging_block_profile(torch.load(ada), trainable, members)  # (T, L)
        profiles["AdaMerging λ (mean over tasks)"] = ada_tasks.mean(0)
    lines = suite_dir / "ta" / "lines-val" / "lines_layers.json"
    if lines.is_file():
        rep = json.loads(lines.read_text())
        profiles[f"LiNeS λ (β = {rep['beta']:g} chosen on validation)"] = np.array(
            [b["lambda"] for b in rep["blocks"]]
        )
    fitted = suite_dir / "ta" / "fitted-scales-val" / "fitted_block_scales.json"
    if fitted.is_file():
        rep = json.loads(fitted.read_text())
        profiles["per-block scales fitted on validation labels (ceiling, over TA)"] = np.array(
            rep["scales"][0][:L]
        )
    full = {**fixed, **task_vector_signals(stats, range(len(tasks)))}
    rng = np.random.default_rng(seed)
    out = {"tasks": tasks, "num_blocks": L, "resamples": resamples, "signals": {}, "rho": []}
    out["signals"] = {k: [float(x) for x in v] for k, v in full.items()}
    out["profiles"] = {k: [float(x) for x in v] for k, v in profiles.items()}
    boot: dict[tuple[str, str], list[float]] = {}
    if ada_tasks is not None:
        for _ in range(resamples):
            idx = rng.integers(0, len(tasks), len(tasks))
            sig = {**fixed, **task_vector_signals(stats, idx)}
            prof = ada_tasks[idx].mean(0)
            for s in SIGNALS:
                boot.setdefault(("AdaMerging λ (mean over tasks)", s), []).append(
                    spearman(prof, sig[s])
                )
    out["rho"] = rho_records(out["profiles"], out["signals"], boot)
    out["critical_rho"] = critical_rho(L)
    return out


def rho_records(profiles: Mapping[str, Sequence[float]], signals: Mapping[str, Sequence[float]],
                boot: Mapping[tuple[str, str], Sequence[float]]) -> list[dict]:  # fmt: skip
    """Per (profile, signal): ρ, the task-resampled interval (``lo``, ``hi``; None without
    resamples) and the permutation p over the blocks."""
    recs = []
    for p, prof in profiles.items():
        for s in SIGNALS:
            rho = spearman(prof, signals[s])
            b = np.array(boot.get((p, s), []), dtype=float)
            b = b[np.isfinite(b)]
            lo, hi = np.percentile(b, [2.5, 97.5]).tolist() if len(b) else (None, None)
            recs.append({"profile": p, "signal": s, "rho": rho, "lo": lo, "hi": hi,
                         "p_blocks": permutation_p(prof, signals[s])})  # fmt: skip
    return recs


def rerender(res: Mapping) -> dict:
    """A committed suite's results with the permutation tests recomputed from its stored
    profiles and signals (the task-resampled intervals are kept as they were)."""
    old = {(r["profile"], r["signal"]): r for r in res["rho"]}
    boot_free = rho_records(res["profiles"], res["signals"], {})
    for r in boot_free:
        prev = old.get((r["profile"], r["signal"]))
        if prev is not None:
            r["lo"], r["hi"] = prev["lo"], prev["hi"]
    return {**res, "rho": boot_free, "critical_rho": critical_rho(res["num_blocks"])}


def render(results: Mapping[str, dict]) -> str:
    """One markdown table: a row per (profile, signal), a column per suite; ρ, its
    task-resampled interval, the permutation p over the blocks (``*``: p < α), and a note
    giving each suite's ρ_crit."""
    suites = list(results)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for suite, res in results.items():
        for r in res["rho"]:
            cell = "—" if not np.isfinite(r["rho"]) else f"{r['rho']:+.2f}"
            if r["lo"] is not None:
                cell += f" [{r['lo']:+.2f}, {r['hi']:+.2f}]"
            p = r.get("p_blocks")
            if p is not None and np.isfinite(p):
                cell += (f", p {p:.3f}" if p >= 0.001 else ", p < 0.001") + (
                    "\\*" if p < ALPHA else ""
                )
            rows.setdefault((r["profile"], r["signal"]), {})[suite] = cell
    crit = ", ".join(
        f"{suite}: {res['num_blocks']} blocks, |ρ| ≥ {res['critical_rho']:.2f}"
        for suite, res in results.items() if "critical_rho" in res
    )  # fmt: skip
    lines = [
        f"Spearman's ρ across the blocks; [task-resampled 95% interval]; p: two-sided permutation "
        f"test over the blocks ({PERMUTATIONS} permutations; \\*: p < {ALPHA}). Smallest "
        f"detectable |ρ| at {ALPHA}: {crit}. A ρ below that is no detectable correlation at "
        "this power, not evidence of none.",
        "",
        "| learned profile | data-free signal | " + " | ".join(suites) + " |",
        "|---|---|" + "---|" * len(suites),
    ]
    for (p, s), cells in rows.items():
        lines.append(
            f"| {p} | {SIGNAL_LABELS[s]} | " + " | ".join(cells.get(x, "") for x in suites) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(results)
    profiles = list(dict.fromkeys(r["profile"] for res in results.values() for r in res["rho"]))
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 3.2), squeeze=False,
                             sharey=True, layout="constrained")  # fmt: skip
    for ax, p in zip(axes[0], profiles, strict=True):
        for k, suite in enumerate(suites):
            recs = {r["signal"]: r for r in results[suite]["rho"] if r["profile"] == p}
            y = np.arange(len(SIGNALS)) + 0.15 * (k - (len(suites) - 1) / 2)
            x = [recs[s]["rho"] if s in recs else np.nan for s in SIGNALS]
            err = [[max(0.0, x[i] - recs[s]["lo"]) if s in recs and recs[s]["lo"] is not None else 0.0
                    for i, s in enumerate(SIGNALS)],
                   [max(0.0, recs[s]["hi"] - x[i]) if s in recs and recs[s]["hi"] is not None else 0.0
                    for i, s in enumerate(SIGNALS)]]  # fmt: skip
            ax.errorbar(x, y, xerr=err, fmt="o", capsize=2, label=suite)
        crit = max((res.get("critical_rho", 0.0) for res in results.values()), default=0.0)
        if crit:  # the band no test over the blocks can tell from 0 (module doc)
            ax.axvspan(-crit, crit, color="0.92", zorder=0, label=f"|ρ| < {crit:.2f}: undetectable")
        ax.axvline(0, color="0.4", lw=1, ls="--")
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("Spearman ρ across blocks (95% interval: tasks resampled)", fontsize=8)
    axes[0][0].set_yticks(range(len(SIGNALS)), [SIGNAL_LABELS[s] for s in SIGNALS], fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from .testbed.pools import open_testbed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the benchmark's output folder")
    ap.add_argument("--suites", nargs="+", required=True,
                    help="bench-testbed-<recipe> folders, or SUITE=RECIPE (e.g. bench=full: a "
                    "benchmark run on one pool)")  # fmt: skip
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--rerender", action="store_true",
                    help="recompute the permutation tests from the committed signals.json "
                    "(no testbed needed)")  # fmt: skip
    args = ap.parse_args(argv)
    art = args.out / "artefacts"
    stored = json.loads((art / "signals.json").read_text()) if args.rerender else {}
    results = {}
    for spec in args.suites:
        suite, _, recipe = spec.partition("=")
        if args.rerender:
            results[suite] = rerender(stored[suite])
            continue
        recipe = recipe or suite.removeprefix("bench-testbed-")
        results[suite] = correlations(args.out / "runs" / suite, open_testbed(recipe),
                                      args.resamples)  # fmt: skip
    art.mkdir(parents=True, exist_ok=True)
    (art / "signals.json").write_text(json.dumps(results, indent=1) + "\n")
    (art / "signals.md").write_text(render(results))
    plot(results, art / "signals.png")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
