"""rlmcmc: multi-agent actor-critic proposals for two-level MCMC on a multiscale Darcy inverse problem
with a GMsFEM coarse solver, after Chung, Efendiev, Leung, Pun & Zhang, *Multi-agent reinforcement
learning accelerated MCMC on multiscale inversion problems*. See docs/rlmcmc.md."""

from .forward import DarcyProblem, PermeabilityModel, Q1Mesh, observation_points, solve_steady, solve_transient
from .gmsfem import GMsFEMProblem
from .problem import InverseProblem, ProblemConfig, make_problem
from .proposals import PCNProposal, RandomWalkProposal, make_proposal
from .sampling import ChainResult, LinearForward, Posterior, linear_gaussian_posterior, run_chain, run_chains

__all__ = [
    "ChainResult", "DarcyProblem", "GMsFEMProblem", "InverseProblem", "LinearForward", "PCNProposal",
    "PermeabilityModel", "Posterior", "ProblemConfig", "Q1Mesh", "RandomWalkProposal",
    "linear_gaussian_posterior", "make_problem", "make_proposal", "observation_points", "run_chain",
    "run_chains", "solve_steady", "solve_transient",
]
