"""Shared fixtures: a tiny OPT built from a config (no download), shaped like opt-350m."""

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM


def tiny_opt_config(**overrides):
    """Return an OPTConfig with opt-350m's structure (project_in/out, post-LN, tied lm_head), scaled down."""
    settings = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=False,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    settings.update(overrides)
    return OPTConfig(**settings)


@pytest.fixture
def tiny_opt():
    torch.manual_seed(0)
    return OPTForCausalLM(tiny_opt_config()).eval()
