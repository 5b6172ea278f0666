"""CTC decoding and error counts for corpus-level WER and CER."""

from __future__ import annotations

from collections.abc import Sequence

import jiwer
import torch
from torch import Tensor

__all__ = ["greedy_decode", "error_counts", "sample_cer"]


def greedy_decode(logits: Tensor, lengths: Tensor, blank: int) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, merge repeats, drop blanks.

    Args:
        logits: (B, T, C) scores.
        lengths: (B,) valid frames per utterance.
        blank: index of the blank.
    """
    best = logits.argmax(dim=-1).cpu()
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= best != blank
    return [best[i, : int(n)][keep[i, : int(n)]].tolist() for i, n in enumerate(lengths.cpu())]


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> list[int]:
    """``[word_edits, reference_words, char_edits, reference_chars]`` from jiwer.

    Summed over batches (and ranks) they give corpus-level WER = word_edits / words and
    CER = char_edits / chars, the numbers jiwer reports for the whole corpus at once.
    """
    words = jiwer.process_words(list(references), list(hypotheses))
    chars = jiwer.process_characters(list(references), list(hypotheses))
    return [
        words.substitutions + words.deletions + words.insertions,
        words.hits + words.substitutions + words.deletions,
        chars.substitutions + chars.deletions + chars.insertions,
        chars.hits + chars.substitutions + chars.deletions,
    ]


def sample_cer(reference: str, hypothesis: str) -> float:
    """Character error rate of one utterance."""
    return float(jiwer.cer(reference, hypothesis))
