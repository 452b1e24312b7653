"""Speculative decoding with a quantised draft of the same model.

The draft (e.g. the INT4 checkpoint) proposes `k` tokens one at a time; the verifier (the
INT8 or unquantised model) scores all of them in one forward pass over k + 1 positions.
Proposals are accepted with the standard rule, so the output distribution is exactly the
verifier's (Leviathan et al. 2023; Chen et al. 2023):

- greedy: a proposal is accepted while it equals the verifier's argmax; the first
  mismatch is replaced by that argmax. The tokens are the verifier's own greedy tokens.
- sampling: proposal d drawn from the draft's q is accepted with probability
  min(1, p(d) / q(d)); on rejection the token is drawn from max(0, p - q), normalised.
  Both p and q are the distributions after temperature / top-k / top-p.

When all k proposals are accepted the verifier's pass also yields one more token, so each
round emits between 1 and k + 1 tokens for one verifier pass. Caches need no copying on
rejection: entries past the accepted tokens are simply overwritten later, and reads stop
at the current length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from compress.errors import CompressError
from compress.models import CausalLM
from compress.serving.generation import SamplingParams, sample, sampling_probs


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0  # verifier passes after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class SpeculativeDecoder:
    def __init__(self, target: CausalLM, draft: CausalLM, k: int = 4):
        if k < 1:
            raise CompressError("the draft must propose at least 1 token per round")
        if target.cfg.vocab_size != draft.cfg.vocab_size:
            raise CompressError(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs "
                                f"from the target's ({target.cfg.vocab_size}); draft with a "
                                "quantised checkpoint of the same model")
        self.target, self.draft, self.k = target, draft, k
        self.stats = SpeculativeStats()

    @torch.inference_mode()
    def generate(self, prompt: list[int], params: SamplingParams) -> Iterator[int]:
        """New tokens one at a time, distributed exactly as the target's would be."""
        if not prompt:
            raise CompressError("the prompt is empty; give at least one token of text")
        total = len(prompt) + params.max_new_tokens + self.k + 1
        for model in (self.target, self.draft):
            if total > model.cfg.max_positions:
                raise CompressError(f"prompt ({len(prompt)}) + max new tokens "
                                    f"({params.max_new_tokens}) + draft tokens ({self.k}) "
                                    f"exceeds the model's {model.cfg.max_positions} positions")
        device = self.target.device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        t_cache, d_cache = self.target.new_cache(1, total), self.draft.new_cache(1, total)
        tokens = torch.tensor([prompt], device=device)
        logits = self.target(tokens, 0, t_cache, last_only=True)[:, -1]
        d_logits = self.draft(tokens, 0, d_cache, last_only=True)[:, -1]
        token = int(sample(logits, params, generator))
        emitted = 1
        yield token
        if token in params.stop_token_ids:
            return
        pos = len(prompt)  # where `token` goes in both caches
        pending = [token]  # tokens the draft has not seen yet, ending with the last one
        while emitted < params.max_new_tokens:
            # never propose past the last token wanted (the verifier's extra token past it
            # is dropped)
            k = min(self.k, params.max_new_tokens - emitted)
            proposals, q_dists = [], []
            d_pos = pos - len(pending) + 1
            for _ in range(k):
                step = torch.tensor([pending], device=device)
                d_logits = self.draft(step, d_pos, d_cache)[:, -1]
                d_pos += len(pending)
                if params.temperature == 0:
                    proposal = int(d_logits.argmax(-1))
                else:
                    q = sampling_probs(d_logits, params)[0]
                    proposal = int(torch.multinomial(q, 1, generator=generator))
                    q_dists.append(q)
                proposals.append(proposal)
                pending = [proposal]
            verify = torch.tensor([[token, *proposals]], device=device)
            t_logits = self.target(verify, pos, t_cache)[0]  # (k + 1, vocab)
            self.stats.rounds += 1
            self.stats.proposed += k
            out = self._accept(proposals, q_dists, t_logits, params, generator)
            self.stats.accepted += len(out) - 1
            for t in out:
                emitted += 1
                yield t
                if t in params.stop_token_ids or emitted >= params.max_new_tokens:
                    return
            accepted = len(out) - 1
            # the draft saw the proposals up to the last one fed back; if all k were
            # accepted, the k-th is still unseen, before the verifier's extra token
            pending = [proposals[-1], out[-1]] if k and accepted == k else [out[-1]]
            pos += accepted + 1
            token = out[-1]

    @staticmethod
    def _accept(proposals: list[int], q_dists: list[torch.Tensor], t_logits: torch.Tensor,
                params: SamplingParams, generator: torch.Generator | None) -> list[int]:
        """The accepted proposals, then the verifier's correction or extra token."""
        out = []
        for i, d in enumerate(proposals):
            if params.temperature == 0:
                best = int(t_logits[i].argmax())
                if best != d:
                    return [*out, best]
            else:
                p, q = sampling_probs(t_logits[i:i + 1], params)[0], q_dists[i]
                u = torch.rand((), generator=generator, device=p.device)
                if u * q[d] > p[d]:  # rejected: u >= p(d) / q(d)
                    residual = (p - q).clamp(min=0)
                    total = residual.sum()
                    fallback = residual / total if total > 0 else p
                    return [*out, int(torch.multinomial(fallback, 1, generator=generator))]
            out.append(d)
        last = t_logits[len(proposals):len(proposals) + 1]
        return [*out, int(sample(last, params, generator))]
