"""Our decoder as an lm-eval model: `--model compress --model_args pretrained=DIR`.

Importing this module registers the model with lm-eval. The class is lm-eval's own
`HFLM` handed our decoder behind a thin adapter, so requests are tokenised, truncated,
batched and scored exactly as `--model hf` does them (loglikelihood,
loglikelihood_rolling, generate_until); only the forward passes differ: they run
through our KV-cache decoder and, for packed checkpoints, our kernels. `generate_until`
decodes each request with the decoder's cached `generate` (greedy unless the task asks
for sampling), stopping at the task's stop strings or end of text.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig

from compress import data, models
from compress.serving import generation


class _DecoderAsHF(torch.nn.Module):
    """What HFLM touches of a transformers model, served by our decoder."""

    def __init__(self, model: models.CausalLM, path: Path):
        super().__init__()
        self.decoder = model
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        # The packed weights are ours to run: keep transformers' quantizer out of it.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        self.config = config
        self.name_or_path = str(path)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    def tie_weights(self) -> None:  # the decoder ties (or not) at load time
        pass

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        with torch.inference_mode():
            return SimpleNamespace(logits=self.decoder(input_ids.to(self.device)))


@register_model("compress")
class CompressLM(HFLM):
    """lm-eval model over a compress (packed) or plain Hugging Face checkpoint directory."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, **kwargs):
        device = device or "cpu"
        model, files = models.load(pretrained, device=device)
        self.checkpoint = files
        self._max_gen_toks = int(max_gen_toks)
        super().__init__(pretrained=_DecoderAsHF(model, files.path),
                         tokenizer=data.load_tokenizer(files.path), backend="causal",
                         batch_size=batch_size, max_length=max_length, **kwargs)
        self.pretrained = str(files.path)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(self._model.dtype), "model_path": self.pretrained,
                "packed": self.checkpoint.is_quantized}

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                        **generation_kwargs) -> torch.Tensor:
        """Left-padded contexts (B, L) -> (B, L + new) with each row's continuation."""
        mask = generation_kwargs.pop("attention_mask", None)
        sample = bool(generation_kwargs.get("do_sample")) and \
            float(generation_kwargs.get("temperature") or 0) > 0
        params = generation.SamplingParams(
            max_new_tokens=max(1, max_length - context.shape[1]),
            temperature=float(generation_kwargs.get("temperature") or 0) if sample else 0.0,
            top_k=int(generation_kwargs.get("top_k") or 0) if sample else 0,
            top_p=float(generation_kwargs.get("top_p") or 1.0) if sample else 1.0,
            stop_token_ids=(self.eot_token_id,) if self.eot_token_id is not None else ())
        rows = []
        for i in range(context.shape[0]):
            prompt = context[i][mask[i].bool()] if mask is not None else context[i]
            new: list[int] = []
            for token in generation.generate(self._model.decoder, prompt.tolist(), params):
                if token in params.stop_token_ids:
                    break
                new.append(token)
                if stop and any(s in self.tok_decode(new) for s in stop):
                    break
            rows.append(context[i].tolist() + new)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])
