"""Quality measurements (installed as `compress.evals`): perplexity for now."""

from .perplexity import DEFAULT_CTX, DEFAULT_MAX_TOKENS, PerplexityResult, perplexity

__all__ = ["DEFAULT_CTX", "DEFAULT_MAX_TOKENS", "PerplexityResult", "perplexity"]
