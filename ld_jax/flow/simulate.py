"""Integrate one scenario of the unconstrained features model and plot where the mass goes.

Scenarios:
- `no_vs_never`: the single-token No-vs-Never analogue of paper Section 3. W_No and W_Never
  share a large common part; W_Yes is aligned with W_No − W_Never. Training y+ = No over
  y− = Never moves h_x along W_No − W_Never, which favours Yes most: Yes overtakes No.
- `multi_token`: one multi-token sample whose y− resembles y+ (`similarity` ω of
  `claims.ches_population`); the CHES trajectory is plotted too.
- `many_samples`: a dataset of single-token samples with distinct prompts, of which sample 1
  contradicts sample 0 (ỹ− = y+) when `contradicting`; sample 0 is shown (Theorem 8).

Writes `trajectory.json` (times, ln π(y±) of sample 0, ln π(·|x_0), CHES), `summary.md` and
`flow.png` under `out_dir`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import matplotlib
import numpy as np

from ld_jax import files
from ld_jax.flow import claims, dynamics, state, theorems
from ld_jax.losses import LossConfig

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402

SCENARIOS = ("no_vs_never", "multi_token", "many_samples")
NO_VS_NEVER_TOKENS = ("Yes", "No", "Never", "Maybe", "Perhaps", "Sure", "Certainly", "Absolutely")


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """One `ld-jax flow simulate` run. t1 is in flow time; n_save points are stored and plotted."""

    scenario: str = "no_vs_never"
    seed: int = 0
    t1: float = 120.0
    n_save: int = 241
    vocab: int = 12  # multi_token / many_samples (no_vs_never has its 8 named tokens)
    dim: int = 8
    length: int = 4  # multi_token: |y+| = |y−|
    similarity: float = 0.9  # multi_token: ω
    samples: int = 4  # many_samples
    contradicting: bool = True  # many_samples: sample 1 has ỹ− = y+_0
    top_k: int = 3
    loss: LossConfig = LossConfig()
    out_dir: str = "results/flow/no_vs_never"

    def __post_init__(self):
        if self.scenario not in SCENARIOS:
            raise ValueError(
                f"unknown scenario {self.scenario!r}; choose one of {', '.join(SCENARIOS)}"
            )
        if self.t1 <= 0 or self.n_save < 2:
            raise ValueError("need t1 > 0 and n_save >= 2")


def no_vs_never(rng: np.random.Generator, dim: int = 8):
    """W_{No,Never} = c ± 0.6δ (cosine 0.84), W_Yes = 4δ + noise, h_x = 0.2ĉ + noise."""
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    c = 2.0 * unit(rng.standard_normal(dim))
    delta = rng.standard_normal(dim)
    delta = unit(delta - delta @ unit(c) * unit(c))
    W = 0.3 * rng.standard_normal((len(NO_VS_NEVER_TOKENS), dim))
    W[1], W[2] = c + 0.6 * delta, c - 0.6 * delta
    W[0] = 4.0 * delta + 0.2 * rng.standard_normal(dim)
    h = 0.2 * unit(c) + 0.05 * rng.standard_normal(dim)
    one = np.zeros((1, 1, 1), np.int64)
    return state.population(
        {"W": W[None], "h": h[None, None]},
        {"plus_tokens": one + 1, "plus_states": one, "minus_tokens": one + 2, "minus_states": one},
    )


def build(cfg: SimulateConfig):
    """(params, problem, token names) of the scenario, one instance."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.scenario == "no_vs_never":
        params, problem = no_vs_never(rng, cfg.dim)
        names = NO_VS_NEVER_TOKENS
    else:
        if cfg.scenario == "multi_token":
            params, problem = claims.ches_population(
                rng, 1, cfg.length, cfg.vocab, cfg.dim, omega=cfg.similarity
            )
        else:
            params, problem = state.many_samples(rng, 1, cfg.vocab, cfg.dim, cfg.samples)
            if cfg.contradicting:
                problem = _contradict(problem)
        names = tuple(f"t{i}" for i in range(cfg.vocab))
    return state.take(params, 0), state.take(problem, 0), names


def _contradict(problem: state.Problem) -> state.Problem:
    """Sample 1 becomes (x_1, ỹ+, y+_0) with ỹ+ its old ỹ+, or ỹ− if that was y+_0."""
    plus, minus = np.array(problem.plus_tokens), np.array(problem.minus_tokens)
    y0 = plus[0, 0, 0]
    if plus[0, 1, 0] == y0:
        plus[0, 1, 0] = minus[0, 1, 0]
    minus[0, 1, 0] = y0
    problem = dataclasses.replace(
        problem, plus_tokens=jax.numpy.asarray(plus), minus_tokens=jax.numpy.asarray(minus)
    )
    return problem


@jax.jit
def _observe(traj, problem):
    """ln π(y±_0|x_0) `[T]`, ln π(·|x_0) `[T, V]` and CHES of sample 0 `[T]` along a trajectory."""
    lp_plus, lp_minus = jax.vmap(lambda p: state.logprobs(p, problem))(traj)
    prompt = jax.vmap(lambda p: state.next_token_logprobs(p, problem.plus_states[0, 0]))(traj)
    return (
        lp_plus[:, 0],
        lp_minus[:, 0],
        prompt,
        jax.vmap(lambda p: theorems.ches(p, problem))(traj),
    )


@state.float64
def simulate(cfg: SimulateConfig) -> dict:
    """Integrate the scenario's flow and write its JSON, Markdown summary and PNG."""
    params, problem, names = build(cfg)
    problem = state.with_reference(params, problem)
    ts, traj = dynamics.integrate(
        params, problem, cfg.loss, cfg.t1, n_save=cfg.n_save, progress=True
    )
    lp_plus, lp_minus, prompt, ches = (np.asarray(a) for a in _observe(traj, problem))
    y_plus, y_minus = int(problem.plus_tokens[0, 0]), int(problem.minus_tokens[0, 0])
    gain = prompt.max(0) - prompt[0]  # largest rise of ln π(z|x) over the run
    gain[[y_plus, y_minus]] = -np.inf
    top = [int(z) for z in np.argsort(-gain)[: cfg.top_k]]
    result = {
        "config": dataclasses.asdict(cfg),
        "tokens": list(names),
        "y_plus": names[y_plus] if problem.plus_tokens.shape[1] == 1 else None,
        "t": np.asarray(ts).tolist(),
        "logpi_plus": lp_plus.tolist(),
        "logpi_minus": lp_minus.tolist(),
        "prompt_logprobs": prompt.tolist(),
        "top_gainers": [names[z] for z in top],
    }
    if cfg.scenario == "multi_token":
        result["ches"] = ches.tolist()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "trajectory.json", json.dumps(result) + "\n")
    files.write_text(out / "summary.md", _summary(result, y_plus, top))
    _plot(result, y_plus, top, out / "flow.png")
    return result


def _summary(r: dict, y_plus: int, top: list[int]) -> str:
    """Markdown: initial/lowest/final ln π(y±) and the top gainers with their overtaking times."""
    lp, t = np.asarray(r["logpi_plus"]), np.asarray(r["t"])
    prompt = np.asarray(r["prompt_logprobs"])
    lines = [
        f"# Flow scenario `{r['config']['scenario']}`\n",
        "| quantity | t = 0 | min over run (t) | final |",
        "|:--|--:|--:|--:|",
        f"| ln π(y+\\|x) | {lp[0]:.3f} | {lp.min():.3f} ({t[lp.argmin()]:.1f}) | {lp[-1]:.3f} |",
        f"| ln π(y−\\|x) | {r['logpi_minus'][0]:.3f} | {min(r['logpi_minus']):.3f} | {r['logpi_minus'][-1]:.3f} |",
    ]
    if "ches" in r:
        lines.append(f"| CHES | {r['ches'][0]:.3f} | {min(r['ches']):.3f} | {r['ches'][-1]:.3f} |")
    lines += [
        "",
        "| top gaining token z | π(z\\|x) at t = 0 | max π(z\\|x) (t) | first t with π(z\\|x) > π(y+_1\\|x) |",
        "|:--|--:|--:|--:|",
    ]
    for z in top:
        above = np.nonzero(prompt[:, z] > prompt[:, y_plus])[0]
        lines.append(
            f"| {r['tokens'][z]} | {np.exp(prompt[0, z]):.3f} | {np.exp(prompt[:, z].max()):.3f} "
            f"({t[prompt[:, z].argmax()]:.1f}) | {f'{t[above[0]]:.1f}' if len(above) else 'never'} |"
        )
    displaced = lp.min() < lp[0]
    lines += [
        "",
        f"Likelihood displacement: {'yes' if displaced else 'no'} "
        f"(largest fall of ln π(y+|x): {lp[0] - lp.min():.3f} nats).\n",
    ]
    return "\n".join(lines)


def _plot(r: dict, y_plus: int, top: list[int], path: Path) -> None:
    t, prompt, names = np.asarray(r["t"]), np.asarray(r["prompt_logprobs"]), r["tokens"]
    panels = 3 if "ches" in r else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    axes[0].plot(t, r["logpi_plus"], label="ln π(y+|x)", lw=2)
    axes[0].plot(t, r["logpi_minus"], label="ln π(y−|x)", lw=2)
    axes[0].set(xlabel="flow time t", ylabel="log-probability", title="preferred / dispreferred")
    axes[1].plot(t, np.exp(prompt[:, y_plus]), label=f"{names[y_plus]} (y+₁)", lw=2, color="k")
    for z in top:
        axes[1].plot(t, np.exp(prompt[:, z]), label=names[z])
    axes[1].set(xlabel="flow time t", ylabel="π(z|x)", title="top gaining first tokens")
    if "ches" in r:
        axes[2].plot(t, r["ches"], color="C3")
        axes[2].set(xlabel="flow time t", ylabel="CHES_x(y+, y−)", title="CHES trajectory")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(
        f"unconstrained features flow: {r['config']['scenario']} ({r['config']['loss']['name']})"
    )
    files.save_figure(fig, path, dpi=120)
    plt.close(fig)
