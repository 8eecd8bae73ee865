"""Tiny language models built from configs with random weights (no download): a character
tokenizer, a GPT-2 policy (the proxy reward model starts from a trained policy: sorting_task)."""

from __future__ import annotations

from asyncgen.catalogue.frame import require_extra

require_extra("rlhf", "transformers", "tokenizers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

CHARACTERS = "0123456789abcdefghijklmnopqrstuvwxyz ="


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (digits, letters, space, ``=``) plus ``<eos>``, ``<pad>``, ``<unk>``."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def gpt2_config(tokenizer, n_embd: int = 64, n_layer: int = 2, n_head: int = 2, n_positions: int = 64,
                **kwargs) -> GPT2Config:
    return GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                      n_head=n_head, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **kwargs)


def tiny_policy(tokenizer, n_embd: int = 64, seed: int = 0, **kwargs) -> GPT2LMHeadModel:
    """``GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64)`` with random weights from ``seed``."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(tokenizer, n_embd=n_embd, **kwargs))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
