"""Quantisation algorithms: pure functions from tensors (+ statistics) to `QuantizedWeight`."""

from compress.kernels import QuantizedWeight, num_groups

from .scheme import QuantScheme

# Raised whenever an algorithm's output for the same settings changes (a new default, a new
# grid), so cached results measured with the old rounding (report cells, sensitivity
# tables) are measured again rather than shown beside new ones. 2: GPTQ matches the
# unquantised model, learned rounding's target and schedule; 3: the signed symmetric grid;
# 4: learned rounding keeps the best of its last step, best batch and start on the whole set;
# 5: awq+gptq scores its scalings with GPTQ rounding them; 6: learned rounding's default
# loss is the normed one on Gemma-2/3.
REVISION = 6

__all__ = ["REVISION", "QuantScheme", "QuantizedWeight", "num_groups"]
