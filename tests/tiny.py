"""Tiny test models: the real SmolLM2 tokenizer (with its chat template) on a 2-layer Llama.

Building one takes ~10 s (reading the tokenizer out of the GGUF), so tests build it once per
session; everything that loads it then takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatloop.models import default_model_source


def build_tiny_model(target: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = default_model_source()
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,  # larger than the default so greedy replies vary (not one repeated token)
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
