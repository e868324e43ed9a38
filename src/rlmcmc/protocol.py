"""The comparison protocol of issue 14: tuned baselines vs the multi-agent actor-critic, with replicates.

One run is organised in cached *units* (one JSON file each under ``out/units/``), so an interrupted run
resumes where it stopped and a later session can finish it:

* ``setup``: the problem, the approximation-error model (fine solves), the measured cost of a coarse solve
  in fine-solve units, a coarse pCN pilot chain (starting points, pilot mean and covariance), and the
  first-level Jacobian at the pilot mean for the actors' gradient proxy;
* ``sweep/<method>/<target>``: a short tuning run (own seed) per method, level and stage-1 acceptance
  target (or covariance inflation for the independence proposal); the best target by ESS per fine-solve
  equivalent is used for every replicate, so each row is tuned for the reported metric;
* ``train/<rep>``: per replicate, the MARL training run and the Gaussian independence fit on a coarse chain
  with the same number of coarse solves;
* ``run/<method>/<rep>``: ``n_chains`` x (``n_burn`` + ``n_samples``) steps of one method, one replicate;
* ``aem``: the enhanced-error model (:mod:`rlmcmc.aem`): ``aem_pairs`` fine + coarse solve pairs at draws
  from the pilot Gaussian, then a pilot chain on the corrected coarse posterior (its mean, covariance and
  Jacobian are the geometry of every ``+aem`` row); all of it an offline cost of those rows;
* ``train-aem/<rep>``: per replicate, the MARL training of ``marl-gpcn+aem`` (generalized-pCN base with the
  tuned β of ``gpcn+aem-2``, trained on the corrected two-level chain).

Rows whose method ends in ``+aem`` are two-level only and use the corrected coarse posterior at stage 1
(the second stage is always the exact fine posterior).

Costs: ESS per fine-solve equivalent = min bulk ESS / (fine solves + coarse solves x c_coarse), with
c_coarse the measured CPU time of a coarse solve over that of a fine solve. Offline costs (error model,
pilot, Jacobian, training, independence fit) are reported beside and amortized over ``amortize_draws``
posterior draws.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .diagnostics import summarize
from .aem import CorrelatedErrorPosterior, error_model_from_pairs
from .marl import MARLConfig, MARLProposal, MARLTrainConfig, Whitening, jacobian_fd, save_marl, train_marl
from .problem import InverseProblem, ProblemConfig, make_problem
from .proposals import AdaptiveMetropolisProposal, LinearGaussianProposal, PCNProposal, cholesky_of_draws
from .sampling import run_chains

BASELINES = ("pcn", "rw-cov", "gpcn", "am", "indep", "rw-cov+aem", "gpcn+aem", "gpcn-over+aem")
RL_METHODS = ("marl", "marl-gpcn+aem")
AEM_SUFFIX = "+aem"

BENCHMARKS = {
    # today's posterior: 8 KL modes, fine 40², GMsFEM 8² x 4
    "kl8": ProblemConfig(n_fine=40, n_coarse=8, n_basis=4, dim=8, noise_level=0.02, seed=1),
    # the harder one: 32 KL modes + 2 channel shifts (non-Gaussian), fine 64², GMsFEM 8² x 3
    "kl32-channels": ProblemConfig(n_fine=64, n_coarse=8, n_basis=3, dim=32, noise_level=0.02, seed=1,
                                   geometry=True),
    # transient (parabolic) Darcy flow u_t - div(κ∇u) = f, T = 0.01, 20 backward-Euler steps, data at steps
    # 5, 10, 20 (75 data); the kl8 field, fine 32² (kl8: 40²), GMsFEM 8² x 4
    "kl8-transient": ProblemConfig(n_fine=32, n_coarse=8, n_basis=4, dim=8, noise_level=0.02, seed=1,
                                   kind="transient", n_steps=20),
    # tiny, for tests and --quick
    "tiny": ProblemConfig(n_fine=16, n_coarse=4, n_basis=3, dim=4, noise_level=0.05, seed=2),
    "tiny-transient": ProblemConfig(n_fine=16, n_coarse=4, n_basis=3, dim=4, noise_level=0.05, seed=2,
                                    kind="transient", n_steps=8),
}


@dataclass
class Protocol:
    """Every row of a benchmark uses the same chain count and length."""

    benchmark: str = "kl8"
    methods: tuple = ("pcn", "rw-cov", "gpcn", "am", "indep", "marl")
    levels: tuple = (1, 2)
    n_chains: int = 4
    n_samples: int = 2500
    n_burn: int = 500
    n_replicates: int = 5
    targets: tuple = (0.05, 0.1, 0.2, 0.35)
    inflations: tuple = (1.0, 1.3, 1.7)
    sweep_chains: int = 2
    sweep_samples: int = 1500
    pilot_steps: int = 4000
    error_model_samples: int = 20
    train_envs: int = 32
    train_iters: int = 250
    n_agents: int = 4
    safe_weight: float = 0.2
    amortize_draws: int = 100_000
    # two-level rows with the enhanced-error (pilot-pair) coarse model; their sizes
    aem_methods: tuple = ()
    aem_pairs: int = 60
    overrelax_betas: tuple = (0.7, 0.85, 0.95)  # swept β of the over-relaxed gpCN (ρ = -sqrt(1 - β²))
    extra: dict = field(default_factory=dict)

    def method_names(self) -> list[str]:
        return [f"{m}-{lv}" for m in self.methods for lv in self.levels] + \
            ([f"{m}-2" for m in self.aem_methods] if 2 in self.levels else [])


def _dump(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, default=float)
    os.replace(tmp, path)


def _load(path):
    with open(path) as fh:
        return json.load(fh)


class Runner:
    """Runs (or loads from cache) every unit of one protocol under ``out``; ``log`` gets progress lines."""

    def __init__(self, protocol: Protocol, out: str, log=print):
        if protocol.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {protocol.benchmark!r}; choose one of {sorted(BENCHMARKS)}")
        self.p = protocol
        self.out = out
        self.log = log
        self.problem: InverseProblem = make_problem(BENCHMARKS[protocol.benchmark])
        self._setup = None
        self.t_start = time.time()

    # ---- setup -------------------------------------------------------------------------------------------
    def unit_path(self, *parts) -> str:
        return os.path.join(self.out, "units", *parts) + ".json"

    def setup(self) -> dict:
        if self._setup is not None:
            return self._setup
        path = self.unit_path("setup")
        problem = self.problem
        if os.path.exists(path):
            s = _load(path)
            problem.error_bias, problem.error_var = np.array(s["error_bias"]), np.array(s["error_var"])
        else:
            t0 = time.process_time()
            n_err = problem.calibrate_error_model(self.p.error_model_samples)
            t_err = time.process_time() - t0
            fine, coarse = problem.posteriors()
            rng = np.random.default_rng(0)
            thetas = rng.standard_normal((30, problem.fine.dim))
            t0 = time.process_time()
            for t in thetas:
                fine.evaluate(t)
            t_f = (time.process_time() - t0) / len(thetas)
            t0 = time.process_time()
            for _ in range(5):
                for t in thetas:
                    coarse.evaluate(t)
            t_c = (time.process_time() - t0) / (5 * len(thetas))
            # Pilot: coarse-only pCN chain, step tuned in burn-in to 25%.
            _, coarse = problem.posteriors()
            t0 = time.process_time()
            run = run_chains(coarse, PCNProposal(problem.fine.dim, 0.2), 1, self.p.pilot_steps, seed=10_000,
                             n_burn=self.p.pilot_steps, tune=True, progress=False)[0]
            mean, chol = cholesky_of_draws(run.samples[::2])
            jac = jacobian_fd(coarse, mean)
            t_pilot = time.process_time() - t0
            idx = np.linspace(self.p.pilot_steps // 4, self.p.pilot_steps - 1, self.p.n_chains).astype(int)
            s = {"error_bias": problem.error_bias.tolist(), "error_var": problem.error_var.tolist(),
                 "error_model_fine_solves": n_err, "error_model_cpu_s": t_err,
                 "fine_solve_s": t_f, "coarse_solve_s": t_c, "cost_coarse": t_c / t_f,
                 "pilot_coarse_solves": coarse.n_evals, "pilot_cpu_s": t_pilot, "pilot_step": run.step,
                 "pilot_mean": mean.tolist(), "pilot_chol": chol.tolist(), "jacobian": jac.tolist(),
                 "inits": run.samples[idx].tolist(), "problem": problem.describe()}
            _dump(s, path)
            self.log(f"[setup] fine {t_f * 1e3:.2f} ms, coarse {t_c * 1e3:.2f} ms per solve "
                     f"(c_coarse = {t_c / t_f:.3f} fine solves); pilot step {run.step:.3f}")
        self._setup = s
        return s

    def whitening(self) -> Whitening:
        s = self.setup()
        return Whitening(np.array(s["pilot_mean"]), np.array(s["pilot_chol"]), np.array(s["jacobian"]))

    def cost(self, fine_solves, coarse_solves) -> float:
        return fine_solves + coarse_solves * self.setup()["cost_coarse"]

    # ---- enhanced-error model ------------------------------------------------------------------------------
    def aem(self) -> dict:
        """The ``aem`` unit: error model from pilot pairs and a pilot chain on the corrected coarse posterior."""
        path = self.unit_path("aem")
        if os.path.exists(path):
            return _load(path)
        s = self.setup()
        problem = self.problem
        d = problem.fine.dim
        chol, mean = np.array(s["pilot_chol"]), np.array(s["pilot_mean"])
        t0 = time.process_time()
        thetas = mean + np.random.default_rng(7).standard_normal((self.p.aem_pairs, d)) @ chol.T
        bias, cov = error_model_from_pairs(problem.fine, problem.coarse, thetas)
        coarse = CorrelatedErrorPosterior(problem.coarse, problem.data, problem.noise_std, bias, cov)
        run = run_chains(coarse, LinearGaussianProposal(chol, 2.38 / np.sqrt(d)), 1, self.p.pilot_steps, seed=10_001,
                         n_burn=self.p.pilot_steps // 2, tune=True, init=np.array(s["inits"])[:1], progress=False)[0]
        pmean, pchol = cholesky_of_draws(run.samples[::2])
        jac = jacobian_fd(coarse, pmean)
        a = {"bias": bias.tolist(), "cov": cov.tolist(), "fine_solves": self.p.aem_pairs,
             "coarse_solves": self.p.aem_pairs + coarse.n_evals, "cpu_s": time.process_time() - t0,
             "pilot_mean": pmean.tolist(), "pilot_chol": pchol.tolist(), "jacobian": jac.tolist(),
             "pilot_accept": run.accept_stage1}
        _dump(a, path)
        self.log(f"[aem] {self.p.aem_pairs} pilot pairs; corrected-coarse pilot accept {run.accept_stage1:.2f}")
        return a

    def posteriors(self, method: str):
        """(fine, first level) for a method name without level: the ``+aem`` methods get the corrected coarse
        posterior, the others the problem's coarse posterior."""
        fine, coarse = self.problem.posteriors()
        if method.endswith(AEM_SUFFIX):
            a = self.aem()
            coarse = CorrelatedErrorPosterior(self.problem.coarse, self.problem.data, self.problem.noise_std,
                                              np.array(a["bias"]), np.array(a["cov"]))
        return fine, coarse

    # ---- proposals -------------------------------------------------------------------------------------------
    def proposal(self, method: str, setting: float, rep: int | None):
        """(proposal, tune?) for a method name without level, at a target/inflation ``setting``."""
        s = self.setup()
        d = self.problem.fine.dim
        chol, mean = np.array(s["pilot_chol"]), np.array(s["pilot_mean"])
        if method == "pcn":
            return PCNProposal(d, min(0.9, float(s["pilot_step"]))), True
        if method == "rw-cov":
            return LinearGaussianProposal(chol, 2.38 / np.sqrt(d), kind="rw"), True
        if method == "gpcn":
            return LinearGaussianProposal(chol, 0.5, mean=mean, kind="gpcn"), True
        if method == "am":
            return AdaptiveMetropolisProposal(d, 2.38 / np.sqrt(d), chol=0.1 * np.eye(d)), True
        if method == "indep":
            fit = self.independence_fit(0 if rep is None else rep)
            return LinearGaussianProposal(np.array(fit["chol"]), setting, mean=np.array(fit["mean"]),
                                          kind="independence"), False
        if method == "marl":
            return self.marl(0 if rep is None else rep), False
        if method == "gpcn-over+aem":
            a = self.aem()
            return LinearGaussianProposal(np.array(a["pilot_chol"]), setting, mean=np.array(a["pilot_mean"]),
                                          kind="gpcn-over"), False
        if method in ("rw-cov+aem", "gpcn+aem"):
            a = self.aem()
            achol, amean = np.array(a["pilot_chol"]), np.array(a["pilot_mean"])
            if method == "rw-cov+aem":
                return LinearGaussianProposal(achol, 2.38 / np.sqrt(d), kind="rw"), True
            return LinearGaussianProposal(achol, 0.5, mean=amean, kind="gpcn"), True
        if method == "marl-gpcn+aem":
            from .marl import load_marl

            rep = 0 if rep is None else rep
            self.train_aem_unit(rep)
            return load_marl(os.path.join(self.out, "units", "train-aem", f"marl_rep{rep}.pt")), False
        raise ValueError(f"unknown method {method!r}; choose from {BASELINES + RL_METHODS}")

    def base_step(self) -> float:
        """The MARL base step s₀: the tuned step of the best pilot-covariance random walk (two-level)."""
        best = self.best_setting("rw-cov-2")
        return float(best["step"])

    # ---- sweep ---------------------------------------------------------------------------------------------
    def settings(self, method: str) -> tuple:
        name = method.rsplit("-", 1)[0]
        if name.startswith("marl"):
            return (float("nan"),)
        if name == "gpcn-over+aem":  # acceptance is not monotone in β here: sweep β itself, no tuning
            return self.p.overrelax_betas
        return self.p.inflations if name == "indep" else self.p.targets

    def _load_sized(self, path: str, n_chains: int, n_samples: int) -> dict:
        """A cached chain unit, refused when it was run with another chain count or length (units cached
        before the size was recorded are taken as they are)."""
        unit = _load(path)
        size = unit.get("size")
        if size is not None and list(size) != [n_chains, n_samples, self.p.n_burn]:
            raise ValueError(f"cached unit {path} has chains x draws x burn-in {size}, the protocol asks for "
                             f"{[n_chains, n_samples, self.p.n_burn]}: remove the stale units directory")
        return unit

    def sweep_unit(self, method: str, setting: float) -> dict:
        path = self.unit_path("sweep", method, f"{setting:g}")
        if os.path.exists(path):
            return self._load_sized(path, self.p.sweep_chains, self.p.sweep_samples)
        name, level = method.rsplit("-", 1)
        res = self._run(name, int(level), setting, None, self.p.sweep_chains, self.p.sweep_samples, seed=50_000)
        res["setting"] = setting
        _dump(res, path)
        return res

    def best_setting(self, method: str) -> dict:
        rows = [self.sweep_unit(method, t) for t in self.settings(method)]
        best = max(rows, key=lambda r: r["ess_per_cost"] if np.isfinite(r["ess_per_cost"]) else -1)
        return {"setting": best["setting"], "step": float(np.median(best["steps"])),
                "sweep": {f"{r['setting']:g}": r["ess_per_cost"] for r in rows}}

    # ---- offline units per replicate -------------------------------------------------------------------------
    def train_unit(self, rep: int) -> dict:
        path = self.unit_path("train", f"rep{rep}")
        ckpt = os.path.join(self.out, "units", "train", f"marl_rep{rep}.pt")
        if os.path.exists(path) and os.path.exists(ckpt):
            return _load(path)
        s = self.setup()
        fine, coarse = self.problem.posteriors()
        cfg, train, inits, hist = self._train_marl(f"train rep{rep}", "MARL", fine, coarse, self.whitening(),
                                                   ckpt, seed=1000 + rep, base_step=self.base_step())
        # The Gaussian independence baseline gets a coarse chain with the same number of coarse solves.
        _, coarse2 = self.problem.posteriors()
        t0 = time.process_time()
        # Half of that budget is burn-in (step tuned towards 25%), half is kept for the fit (at least 10 d).
        n_fit = max(hist["coarse_solves"] // 2, 10 * cfg.dim)
        run = run_chains(coarse2, LinearGaussianProposal(np.array(s["pilot_chol"]), 2.38 / np.sqrt(cfg.dim)), 1,
                         n_fit, seed=20_000 + rep, n_burn=max(0, hist["coarse_solves"] - n_fit), tune=True,
                         init=inits[:1], progress=False)[0]
        mean, chol = cholesky_of_draws(run.samples)
        unit = {"config": asdict(cfg), "train": asdict(train),
                "history": {k: v for k, v in hist.items()},
                "indep_fit": {"mean": mean.tolist(), "chol": chol.tolist(), "coarse_solves": coarse2.n_evals,
                              "cpu_s": time.process_time() - t0}}
        _dump(unit, path)
        return unit

    def _train_marl(self, tag: str, label: str, fine, coarse, white: Whitening, ckpt: str, seed: int, **config):
        """Train the multi-agent actor-critic on the two-level chain (fine, coarse) from the pilot starts,
        save its checkpoint at ``ckpt`` and log its cost; ``config`` holds the MARLConfig fields that differ
        between variants (base kernel and step). Returns (config, train config, starts, history)."""
        s = self.setup()
        cfg = MARLConfig(dim=self.problem.fine.dim, n_agents=min(self.p.n_agents, self.problem.fine.dim),
                         safe_weight=self.p.safe_weight, **config)
        train = MARLTrainConfig(n_envs=self.p.train_envs, n_iters=self.p.train_iters, cost_coarse=s["cost_coarse"],
                                seed=seed)
        inits = np.array(s["inits"])
        inits = np.repeat(inits, int(np.ceil(train.n_envs / len(inits))), axis=0)[: train.n_envs]
        actors, hist = train_marl(fine, coarse, cfg, white, train, inits)
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        save_marl(actors, white, ckpt)
        self.log(f"[{tag}] {label}: {hist['coarse_solves']} coarse + {hist['fine_solves']} fine solves, "
                 f"{hist['cpu_seconds']:.0f} CPU s; reward {np.mean(hist['reward'][:20]):.4f} -> "
                 f"{np.mean(hist['reward'][-20:]):.4f}")
        return cfg, train, inits, hist

    def marl(self, rep: int) -> MARLProposal:
        from .marl import load_marl

        self.train_unit(rep)
        return load_marl(os.path.join(self.out, "units", "train", f"marl_rep{rep}.pt"))

    def independence_fit(self, rep: int) -> dict:
        return self.train_unit(rep)["indep_fit"]

    def train_aem_unit(self, rep: int) -> dict:
        """MARL with the generalized-pCN base (β₀ = the tuned step of ``gpcn+aem-2``, same pilot geometry),
        trained on the corrected two-level chain."""
        path = self.unit_path("train-aem", f"rep{rep}")
        ckpt = os.path.join(self.out, "units", "train-aem", f"marl_rep{rep}.pt")
        if os.path.exists(path) and os.path.exists(ckpt):
            return _load(path)
        a = self.aem()
        fine, coarse = self.posteriors("marl-gpcn+aem")
        white = Whitening(np.array(a["pilot_mean"]), np.array(a["pilot_chol"]), np.array(a["jacobian"]))
        beta0 = float(self.best_setting("gpcn+aem-2")["step"])
        cfg, train, _, hist = self._train_marl(f"train-aem rep{rep}", "MARL-gpCN", fine, coarse, white, ckpt,
                                               seed=2000 + rep, base_step=min(beta0, 0.995), base="gpcn")
        unit = {"config": asdict(cfg), "train": asdict(train), "history": dict(hist)}
        _dump(unit, path)
        return unit

    # ---- chains ----------------------------------------------------------------------------------------------
    def _run(self, name, level, setting, rep, n_chains, n_samples, seed) -> dict:
        fine, coarse = self.posteriors(name)
        prop, tune = self.proposal(name, setting, rep)
        inits = np.array(self.setup()["inits"])
        t0 = time.process_time()
        chains = run_chains(fine, prop, n_chains, n_samples, seed=seed, coarse=coarse if level == 2 else None,
                            n_burn=self.p.n_burn, tune=tune, target_accept=setting if tune else 0.25,
                            init=np.resize(inits, (n_chains, inits.shape[1])), progress=False)
        s = summarize(chains)
        s["ess_per_cost"] = s["ess_min"] / self.cost(s["fine_solves"], s["coarse_solves"])
        s["tail_ess_per_cost"] = s["tail_ess_min"] / self.cost(s["fine_solves"], s["coarse_solves"])
        s["wall_cpu_s"] = time.process_time() - t0
        s["size"] = [n_chains, n_samples, self.p.n_burn]
        s.pop("posterior_mean", None)
        return s

    def run_unit(self, method: str, rep: int) -> dict:
        path = self.unit_path("run", method, f"rep{rep}")
        if os.path.exists(path):
            return self._load_sized(path, self.p.n_chains, self.p.n_samples)
        name, level = method.rsplit("-", 1)
        best = self.best_setting(method) if not name.startswith("marl") else {"setting": float("nan"), "sweep": {}}
        res = self._run(name, int(level), best["setting"], rep, self.p.n_chains, self.p.n_samples, seed=100 * rep)
        res["setting"] = best["setting"]
        res["sweep"] = best["sweep"]
        _dump(res, path)
        return res

    # ---- the whole protocol ----------------------------------------------------------------------------------
    def plan(self, levels=None) -> list[tuple]:
        """Units in execution order. Per level (two-level first: it is what the goal is about): the
        tuning sweeps, then (two-level) the per-replicate training, then the replicate runs, replicate by
        replicate, so an interrupted run has complete replicates of every row."""
        levels = self.p.levels if levels is None else levels
        units = [("setup",)]
        for level in sorted(levels, reverse=True):
            names = [m for m in self.p.method_names() if m.endswith(f"-{level}")]
            aem_names = [m for m in names if m.rsplit("-", 1)[0].endswith(AEM_SUFFIX)]
            for m in names:
                if not m.startswith(("marl", "indep")) and m not in aem_names:
                    units += [("sweep", m, t) for t in self.settings(m)]
            if any(m.startswith(("marl", "indep")) for m in self.p.method_names()):
                units += [("train", r) for r in range(self.p.n_replicates) if ("train", r) not in units]
            for m in names:
                if m.startswith("indep"):
                    units += [("sweep", m, t) for t in self.settings(m)]
            plain = [m for m in names if m not in aem_names]
            if level == 1 and plain:
                # The row with the best tuning sweep decides the best baseline: its replicates run first.
                lead = max((m for m in plain if not m.startswith(("marl", "indep"))),
                           key=lambda m: max(self.sweep_unit(m, t)["ess_per_cost"] for t in self.settings(m)),
                           default=None) if all(self._is_cached(u) for u in units if u[0] == "sweep") else None
                if lead is not None:
                    units += [("run", lead, r) for r in range(self.p.n_replicates)]
                    plain = [m for m in plain if m != lead]
            for r in range(self.p.n_replicates):
                units += [("run", m, r) for m in plain]
            if aem_names:  # the enhanced-error rows after every other row of this level is complete
                units += [("aem",)]
                units += [("sweep", m, t) for m in aem_names if not m.startswith("marl") for t in self.settings(m)]
                for r in range(self.p.n_replicates):  # replicate by replicate, training just before its runs
                    if any(m.startswith("marl") for m in aem_names):
                        units += [("train-aem", r)]
                    units += [("run", m, r) for m in aem_names]
        return units

    def execute(self, levels=None) -> dict:
        """Run (or load) every unit of :meth:`plan` with a progress line and an ETA after each; returns
        the summary of what is complete."""
        units = self.plan(levels)
        t0 = time.time()
        done_time, n_done_timed = 0.0, 0
        for k, u in enumerate(units):
            u0 = time.time()
            cached = self._is_cached(u)
            if u[0] == "setup":
                self.setup()
            elif u[0] == "sweep":
                self.sweep_unit(u[1], u[2])
            elif u[0] == "train":
                self.train_unit(u[1])
            elif u[0] == "aem":
                self.aem()
            elif u[0] == "train-aem":
                self.train_aem_unit(u[1])
            else:
                r = self.run_unit(u[1], u[2])
                if not cached:
                    self.log(f"[run {u[1]} rep{u[2]}] ESS/cost {r['ess_per_cost']:.4f} R-hat {r['rhat_max']:.3f} "
                             f"acc {r['accept_stage1']:.2f}/{r['accept_stage2']:.2f}")
            if not cached:
                done_time += time.time() - u0
                n_done_timed += 1
            left = len(units) - k - 1
            eta = done_time / max(1, n_done_timed) * left
            self.log(f"[{self.p.benchmark}] {k + 1}/{len(units)} units ({'cached' if cached else f'{time.time() - u0:.0f} s'})"
                     f" {u[0]} {' '.join(str(x) for x in u[1:])}; elapsed {time.time() - t0:.0f} s, ETA {eta:.0f} s")
        return self.summary()

    def _is_cached(self, u) -> bool:
        if u[0] == "setup":
            return os.path.exists(self.unit_path("setup"))
        if u[0] == "sweep":
            return os.path.exists(self.unit_path("sweep", u[1], f"{u[2]:g}"))
        if u[0] in ("train", "train-aem"):
            return os.path.exists(self.unit_path(u[0], f"rep{u[1]}"))
        if u[0] == "aem":
            return os.path.exists(self.unit_path("aem"))
        return os.path.exists(self.unit_path("run", u[1], f"rep{u[2]}"))

    # ---- summary ---------------------------------------------------------------------------------------------
    def offline(self) -> dict:
        s = self.setup()
        train = [self.train_unit(r) for r in range(self.p.n_replicates)
                 if os.path.exists(self.unit_path("train", f"rep{r}"))] or [self.train_unit(0)]
        common = self.cost(s["error_model_fine_solves"], s["pilot_coarse_solves"])  # pilot + Jacobian
        marl = float(np.mean([self.cost(t["history"]["fine_solves"], t["history"]["coarse_solves"]) for t in train]))
        indep = float(np.mean([self.cost(0, t["indep_fit"]["coarse_solves"]) for t in train]))
        out = {"common_fine_equiv": common, "marl_training_fine_equiv": marl, "indep_fit_fine_equiv": indep,
               "marl_training_cpu_s": float(np.mean([t["history"]["cpu_seconds"] for t in train])),
               "amortize_draws": self.p.amortize_draws}
        if os.path.exists(self.unit_path("aem")):
            a = self.aem()
            out["aem_fine_equiv"] = self.cost(a["fine_solves"], a["coarse_solves"])
            out["aem_cpu_s"] = a["cpu_s"]
        train_aem = [_load(self.unit_path("train-aem", f"rep{r}")) for r in range(self.p.n_replicates)
                     if os.path.exists(self.unit_path("train-aem", f"rep{r}"))]
        if train_aem:
            out["marl_aem_training_fine_equiv"] = float(np.mean(
                [self.cost(t["history"]["fine_solves"], t["history"]["coarse_solves"]) for t in train_aem]))
            out["marl_aem_training_cpu_s"] = float(np.mean([t["history"]["cpu_seconds"] for t in train_aem]))
        return out

    def summary(self) -> dict:
        s = self.setup()
        off = self.offline()
        rows = []
        draws_per_run = self.p.n_chains * self.p.n_samples
        for m in self.p.method_names():
            # Only finished units: an interrupted run summarizes its complete replicates.
            units = [self.run_unit(m, r) for r in range(self.p.n_replicates)
                     if os.path.exists(self.unit_path("run", m, f"rep{r}"))]
            if len(units) < 2:
                continue
            for u in units:  # units cached before `stuck_chains` existed: no accepted move at all -> ESS 0
                if u.get("stuck_chains") is None and not (u["accept_stage1"] > 0 and not np.isnan(u["accept_stage2"])
                                                            if "-2" in m else u["accept_stage1"] > 0):
                    u["ess_min"] = u["tail_ess_min"] = u["ess_per_cost"] = u["tail_ess_per_cost"] = 0.0
                    u["stuck_chains"] = self.p.n_chains
            name = m.rsplit("-", 1)[0]
            extra = {"marl": off["marl_training_fine_equiv"], "indep": off["indep_fit_fine_equiv"],
                     "marl-gpcn+aem": off.get("marl_aem_training_fine_equiv", 0.0)}.get(name, 0.0)
            if name.endswith(AEM_SUFFIX):
                extra += off.get("aem_fine_equiv", 0.0)
            # Offline cost per kept draw, amortized over `amortize_draws` draws.
            amort = (off["common_fine_equiv"] + extra) / self.p.amortize_draws
            costs = [self.cost(u["fine_solves"], u["coarse_solves"]) for u in units]
            rows.append({
                "method": m, "rl": name in RL_METHODS, "n_replicates": len(units),
                "tuned_for": ("ESS per fine-solve equivalent: stage-1 acceptance target swept over "
                              f"{list(self.p.targets)}" if name not in ("indep",) + RL_METHODS else
                              f"ESS per fine-solve equivalent: covariance inflation swept over {list(self.p.inflations)}"
                              if name == "indep" else "trained reward α₁α₂·jump/(c_coarse + α₁ c_fine)")
                if name != "gpcn-over+aem" else f"ESS per fine-solve equivalent: β swept over {list(self.p.overrelax_betas)}",
                "enhanced_error_model": name.endswith(AEM_SUFFIX),
                "setting": units[0]["setting"], "sweep": units[0]["sweep"],
                "ess_per_cost": [u["ess_per_cost"] for u in units],
                "tail_ess_per_cost": [u["tail_ess_per_cost"] for u in units],
                "ess_per_cost_amortized": [u["ess_min"] / (c + amort * draws_per_run) for u, c in zip(units, costs)],
                "ess_min": [u["ess_min"] for u in units], "tail_ess_min": [u["tail_ess_min"] for u in units],
                "max_rhat": float(max(u["rhat_max"] for u in units)),
                "stuck_chains": [u.get("stuck_chains", 0) for u in units],
                "rhat_per_replicate": [u["rhat_max"] for u in units],
                "fine_solves": [u["fine_solves"] for u in units], "coarse_solves": [u["coarse_solves"] for u in units],
                "accept_stage1": float(np.mean([u["accept_stage1"] for u in units])),
                "accept_stage2": float(np.nanmean([u["accept_stage2"] for u in units]))
                if any(np.isfinite(u["accept_stage2"]) for u in units) else float("nan"),
            })
        for r in rows:
            r["mean_ess_per_cost"] = float(np.mean(r["ess_per_cost"]))
        base = [r for r in rows if not r["rl"]]
        best = max(base, key=lambda r: r["mean_ess_per_cost"]) if base else None
        comparisons = {}
        for r in rows:
            if r["rl"] and best is not None:
                ratio, ci = bootstrap_ratio(r["ess_per_cost"], best["ess_per_cost"])
                comparisons[r["method"]] = {"best_baseline": best["method"], "ratio": ratio, "ci95": ci}
        # Headline: the RL method built on the enhanced-error model and the gpCN geometry when it ran.
        head = next((m for m in ("marl-gpcn+aem-2", "marl-2") if m in comparisons), next(iter(comparisons), None))
        rl2 = dict(comparisons[head], method=head) if head else None
        complete = all(r["n_replicates"] == self.p.n_replicates for r in rows) and \
            len(rows) == len(self.p.method_names())
        return {"benchmark": self.p.benchmark, "protocol": asdict(self.p), "replicates": self.p.n_replicates,
                "complete": complete,
                "chains": self.p.n_chains, "draws_per_chain": self.p.n_samples, "burn_in": self.p.n_burn,
                "cost_coarse_in_fine_solves": s["cost_coarse"], "fine_solve_s": s["fine_solve_s"],
                "coarse_solve_s": s["coarse_solve_s"], "offline": off, "rows": rows,
                "rl_vs_best_baseline": rl2, "rl_comparisons": comparisons,
                "goal_met": bool(rl2 and rl2["ratio"] >= 1.5 and rl2["ci95"][0] > 1
                                 and all(r["max_rhat"] <= 1.02 for r in rows))}


def bootstrap_ratio(a, b, n_boot: int = 10_000, seed: int = 0) -> tuple[float, list[float]]:
    """mean(a) / mean(b) and its 95% percentile bootstrap interval (replicates resampled independently)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"need at least 2 replicates per side, got {a.size} and {b.size}")
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1)
    rb = b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)
    ratios = ra / rb
    return float(a.mean() / b.mean()), [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]


def markdown_table(summary: dict) -> str:
    """One row per method: mean ± sd over replicates of ESS per fine-solve equivalent (bulk, tail,
    amortized), worst R-hat, acceptance by stage, the tuned setting."""
    lines = [f"**{summary['benchmark']}**{'' if summary['complete'] else ' (INCOMPLETE run: rows list their finished replicates)'}: {summary['replicates']} replicates x {summary['chains']} chains x "
             f"{summary['draws_per_chain']} draws (+{summary['burn_in']} burn-in); a coarse solve costs "
             f"{summary['cost_coarse_in_fine_solves']:.3f} fine solves; offline costs amortized over "
             f"{summary['offline']['amortize_draws']} draws.", "",
             "| method | RL | reps | tuned setting | bulk ESS / fine-solve equiv. | tail ESS / f.s.e. | amortized | "
             "max R-hat | acc. stage 1 | acc. stage 2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        def ms(x):
            return f"{np.mean(x):.4f} ± {np.std(x, ddof=1):.4f}"
        lines.append(f"| {r['method']} | {'yes' if r['rl'] else 'no'} | {r['n_replicates']} | {r['setting']:.3g} | {ms(r['ess_per_cost'])} | "
                     f"{ms(r['tail_ess_per_cost'])} | {ms(r['ess_per_cost_amortized'])} | {r['max_rhat']:.3f} | "
                     f"{r['accept_stage1']:.2f} | {r['accept_stage2']:.2f} |")
    for m, c in summary["rl_comparisons"].items():
        lines.append("")
        lines.append(f"{m} / best baseline ({c['best_baseline']}): **{c['ratio']:.2f}x**, 95% bootstrap CI "
                     f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]")
    lines.append("")
    lines.append(f"Goal (RL two-level ≥ 1.5x best baseline, CI above 1, every R-hat ≤ 1.02) met: "
                 f"**{'yes' if summary['goal_met'] else 'no'}**")
    return "\n".join(lines)


def plot_summary(summaries: list[dict], path: str) -> None:
    """PNG: per benchmark, ESS per fine-solve equivalent of every row (replicates as dots, mean as bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(7 * len(summaries), 4.5), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        names = [r["method"] for r in s["rows"]]
        x = np.arange(len(names))
        means = [np.mean(r["ess_per_cost"]) for r in s["rows"]]
        colors = ["C3" if r["rl"] else "C0" for r in s["rows"]]
        ax.bar(x, means, color=colors, alpha=0.6)
        for i, r in enumerate(s["rows"]):
            ax.plot(np.full(len(r["ess_per_cost"]), i), r["ess_per_cost"], "k.", ms=4)
            ax.plot([i], [np.mean(r["tail_ess_per_cost"])], "v", color="C2", ms=5,
                    label="tail ESS (mean)" if i == 0 else None)
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylabel("min bulk ESS / fine-solve equivalent")
        worst = max(r["max_rhat"] for r in s["rows"])
        note = f"\nnot converged: R-hat up to {worst:.3g}" if worst > 1.1 else f"\nmax R-hat {worst:.3f}"
        ax.set_title(f"{s['benchmark']}: {s['replicates']} reps x {s['chains']} x {s['draws_per_chain']}{note}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_phases(quick: bool = False) -> list[tuple[Protocol, tuple]]:
    """(protocol, levels) phases of the measured comparison, in execution order: kl8 two-level rows,
    kl32-channels (two-level rows only), kl8 single-level rows, then kl8-transient (every row, reduced:
    fine 32², 800 draws per chain, 150 training iterations). ``quick``: the tiny steady and the tiny
    transient problem, every row, 2 replicates of short chains (for CI)."""
    if quick:
        tiny = dict(n_chains=2, n_samples=300, n_burn=100, n_replicates=2, targets=(0.1, 0.3), inflations=(1.0, 1.5),
                    sweep_chains=2, sweep_samples=200, pilot_steps=500, train_iters=30, train_envs=8, n_agents=2,
                    aem_methods=("gpcn+aem", "marl-gpcn+aem"), aem_pairs=20)
        return [(Protocol(benchmark=name, **tiny), (2, 1)) for name in ("tiny", "tiny-transient")]
    kl8 = Protocol(benchmark="kl8", n_chains=4, n_samples=3500, n_burn=500, n_replicates=5,
                   targets=(0.05, 0.1, 0.2, 0.35), sweep_chains=2, sweep_samples=1500, train_iters=400,
                   aem_methods=("gpcn+aem", "marl-gpcn+aem"))  # gpcn-over+aem: its β sweep failed, no replicates
    # kl32-channels: two-level rows only (a single-level unit would take ~12,000 fine 64² solves, ~3 CPU-min,
    # x 6 rows x 5 replicates: beyond the budget); 2500 draws per chain as on kl8's scale of R-hat.
    kl32 = Protocol(benchmark="kl32-channels", levels=(2,), n_chains=4, n_samples=2500, n_burn=500, n_replicates=5,
                    targets=(0.05, 0.1, 0.25), inflations=(1.0, 1.3), sweep_chains=2, sweep_samples=1000,
                    train_iters=200, aem_methods=("gpcn+aem", "marl-gpcn+aem"))
    # kl8-transient, reduced so that every kl8 row fits the CPU budget: fine grid 32² instead of 40², 800 + 200
    # draws per chain instead of 3500 + 500, 500-draw sweeps, 150 MARL training iterations instead of 400.
    transient = Protocol(benchmark="kl8-transient", n_chains=4, n_samples=800, n_burn=200, n_replicates=5,
                         targets=(0.05, 0.1, 0.2, 0.35), sweep_chains=2, sweep_samples=500, train_iters=150,
                         aem_methods=("gpcn+aem", "marl-gpcn+aem"))
    return [(kl8, (2,)), (kl32, (2,)), (kl8, (1,)), (transient, (2, 1))]


def tinyda_table(check: dict) -> str:
    """Markdown for the tinyDA cross-check of pcn-2 (same algorithm, same β, same starts)."""
    lines = [f"**tinyDA cross-check of pcn-2** (tinyDA {check['tinyDA_version']}, subchain length 1, pCN β = "
             f"{check['beta']:.4f}, {check['chains']} chains x {check['steps']} steps each, same starts):", "",
             "| implementation | acc. stage 1 | acc. stage 2 | min bulk ESS | max R-hat |", "|---|---|---|---|---|"]
    for name, r in check["results"].items():
        lines.append(f"| {name} | {r['accept_stage1']:.3f} | {r['accept_stage2']:.3f} | {r['ess_min']:.0f} | "
                     f"{r['max_rhat']:.3f} |")
    lines += ["", f"stage-1 acceptance difference / its standard error: {check['stage1_diff_over_se']:.2f}; largest "
              f"|posterior-mean difference| / MCSE: {check['max_abs_mean_z']:.2f}"]
    return "\n".join(lines)


def write_outputs(out: str, summaries: dict) -> str:
    """<out>/summary.json (the kl8 summary at top level, every benchmark under "benchmarks"),
    summary.md and summary.png; returns the markdown."""
    main_name = "kl8" if "kl8" in summaries else next(iter(summaries))
    top = dict(summaries[main_name])
    top["benchmarks"] = summaries
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(top, fh, indent=1, default=float)
    md = "\n\n".join(markdown_table(s) for s in summaries.values())
    check_path = os.path.join(out, "tinyda_check.json")
    if os.path.exists(check_path):  # written by benchmarks/mcmc_tinyda_check.py (its own venv)
        top["tinyda_check"] = _load(check_path)
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(top, fh, indent=1, default=float)
        md += "\n\n" + tinyda_table(top["tinyda_check"])
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(md + "\n")
    plot_summary(list(summaries.values()), os.path.join(out, "summary.png"))
    return md


def cached_summary(protocol: Protocol, out: str) -> dict | None:
    """The summary of a benchmark's cached units under ``out``/<benchmark> without running anything, or
    None when its setup (or, with RL rows, the first training unit) is not cached yet."""
    runner = Runner(protocol, os.path.join(out, protocol.benchmark), log=lambda line: None)
    needed = [runner.unit_path("setup")]
    if any(m in RL_METHODS or m == "indep" for m in protocol.methods):
        needed.append(runner.unit_path("train", "rep0"))
    if not all(os.path.exists(p) for p in needed):
        return None
    summary = runner.summary()
    return summary if summary["rows"] else None


def run_comparison(out: str, quick: bool = False, only: str | None = None, summarize_only: bool = False,
                   log=print) -> dict:
    """Run (resuming from cached units) every phase of :func:`default_phases` under ``out`` (only the
    benchmark ``only`` when given); after each phase writes the outputs of every benchmark with cached
    units (so runs of different benchmarks in separate processes do not drop each other's tables) and
    returns {benchmark: summary}."""
    os.makedirs(out, exist_ok=True)
    phases = default_phases(quick)
    protocols = {}
    for protocol, _ in phases:
        protocols.setdefault(protocol.benchmark, protocol)
    summaries = {}
    for protocol, levels in phases:
        if only and protocol.benchmark != only:
            continue
        runner = Runner(protocol, os.path.join(out, protocol.benchmark), log=log)
        if not summarize_only:
            runner.execute(levels)
        summary = runner.summary()
        if summary["rows"]:
            summaries[protocol.benchmark] = summary
            everything = {}
            for name, proto in protocols.items():  # benchmark order of the phases
                other = summaries.get(name) if name in summaries else cached_summary(proto, out)
                if other is not None:
                    everything[name] = other
            log(write_outputs(out, everything))
    return summaries
