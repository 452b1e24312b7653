"""Quality measurements (installed as `compress.evals`): perplexity, the next-token
distribution match against a baseline, and lm-eval tasks (harness.py, lm_eval_model.py,
tasks/)."""

from . import distribution
from .distribution import DistributionMatch, Reference
from .perplexity import DEFAULT_CTX, DEFAULT_MAX_TOKENS, PerplexityResult, perplexity

__all__ = ["DEFAULT_CTX", "DEFAULT_MAX_TOKENS", "DistributionMatch", "PerplexityResult",
           "Reference", "distribution", "perplexity"]
