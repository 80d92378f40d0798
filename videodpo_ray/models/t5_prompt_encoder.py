"""CogVideoX's text side: a T5 tokenizer + encoder turning prompts into embeddings, and the tiny preset's tokenizer.

`T5PromptEncoder` is deliberately not an nn.Module: optimizers, DeepSpeed and state dicts never see the
4.7B-parameter T5-XXL. `tiny_t5_tokenizer` builds a character-level tokenizer in code (no files, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase, T5EncoderModel, T5Tokenizer

from videodpo_ray.models.loading import raise_on_loading_info

# The offline tokenizer of the tiny preset: one unigram piece per character (ids stay below the tiny T5 vocab).
_TINY_TOKENIZER_PIECES = tuple("abcdefghijklmnopqrstuvwxyz0123456789.,'-")


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 tokenizer built in code (no files, no network), for the tiny preset."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(piece, -3.0) for piece in _TINY_TOKENIZER_PIECES]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


class T5PromptEncoder:
    """T5 tokenizer + encoder turning prompts into CogVideoX text embeddings (B, max_length, d_model).

    It follows the denoiser's device on every call (bf16 on CUDA, float32 elsewhere). Prompts are padded/truncated
    to max_length; no attention mask is passed (as CogVideoX was trained).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, encoder: T5EncoderModel, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def from_directory(cls, directory: Path, max_length: int) -> "T5PromptEncoder":
        """Load `directory`/tokenizer and `directory`/text_encoder (strictly)."""
        tokenizer = T5Tokenizer.from_pretrained(str(directory / "tokenizer"))
        source = directory / "text_encoder"
        encoder, info = T5EncoderModel.from_pretrained(str(source), output_loading_info=True, dtype=torch.float32)
        raise_on_loading_info(source, info, target=type(encoder).__name__)
        return cls(tokenizer, encoder, max_length)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.encoder.to(device=device, dtype=dtype)
        input_ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.encoder(input_ids.to(device))[0].float()

    def save_pretrained(self, directory: Path) -> None:
        """Write `directory`/tokenizer and `directory`/text_encoder (what from_directory reads)."""
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self.encoder.save_pretrained(str(directory / "text_encoder"))
