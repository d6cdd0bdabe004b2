"""Export a base model with its deltas merged in, for other runtimes.

``export_hf``: a Hugging Face directory (safetensors, config, tokenizer) that ``transformers``
loads on its own. ``export_gguf``: a GGUF file (f32/f16) for llama-family models, loadable by
llama.cpp tools, by ``transformers`` (``gguf_file=``) and by ``deltatune generate``.
"""
from __future__ import annotations

from deltatune.export.gguf import export_gguf
from deltatune.export.hf import export_hf, merged_state_dict

__all__ = ["export_gguf", "export_hf", "merged_state_dict"]
