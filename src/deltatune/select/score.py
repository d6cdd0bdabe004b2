"""Per-example losses under a causal LM: the likelihood scores GRAPE, quality and diversity use.

For item ``i`` rendered exactly as training renders it (same template, prompt tokens masked)::

    nll_i = -(1/|R_i|) * sum_{t in R_i} log p(x_t | x_<t)      # R_i = trained (response) tokens

``nll_i`` is the length-normalised negative log-likelihood (mean token loss); GRAPE keeps the
response with the smallest one, perplexity is ``exp(nll_i)``. ``model.delta`` scores with an
adapted model (the "current" model of an iterative selection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltatune.data.collate import make_collator
from deltatune.data.config import DataConfig
from deltatune.data.formats import ExampleEncoder
from deltatune.data.sources import Record
from deltatune.select.config import ScoringModelSection
from deltatune.select.pool import Pool


class LikelihoodScorer:
    def __init__(self, config: ScoringModelSection, columns: dict[str, str] | None = None, progress: bool = True):
        self.config = config
        self.columns = dict(columns or {})
        self.progress = progress
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is None:
            import deltatune

            self._tokenizer = deltatune.load_tokenizer(self.config.name)
            model = deltatune.load_model(self.config.name, task="causal-lm")
            if self.config.delta:
                model = deltatune.load_delta(model, self.config.delta)
            self._model = model.eval()

    @torch.inference_mode()
    def mean_nll(self, pool: Pool, indices: list[int] | None = None, desc: str = "score") -> dict[int, float]:
        """``{pool index: mean response-token NLL}`` for ``indices`` (all items by default)."""
        self._load()
        indices = list(range(len(pool))) if indices is None else list(indices)
        # Classification records are scored as plain text: their label is not text to predict.
        as_text = pool.format == "classification"
        fmt = "text" if as_text else pool.format
        data_config = DataConfig(format=fmt, columns={} if as_text else self.columns, max_length=self.config.max_length, truncation=True)
        encoder = ExampleEncoder(data_config, self._tokenizer, fmt)
        collate = make_collator(self._tokenizer, packing=False, mask_dtype=next(self._model.parameters()).dtype)
        examples = []
        for i in indices:
            item = pool.items[i]
            examples.append(encoder(Record({"text": item.text} if as_text else item.data, item.origin))[0])
        order = sorted(range(len(examples)), key=lambda k: -len(examples[k]["input_ids"]))
        out: dict[int, float] = {}
        bs = self.config.batch_size
        for start in tqdm(range(0, len(order), bs), desc=desc, unit="batch", disable=not self.progress):
            chunk = order[start:start + bs]
            batch = collate([examples[k] for k in chunk])
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
            logits = self._model(**inputs).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [b, T-1]
            counts = (labels != -100).sum(1).clamp_min(1)
            for row, k in enumerate(chunk):
                out[indices[k]] = float(loss[row].sum() / counts[row])
        return out
