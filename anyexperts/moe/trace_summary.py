"""Per-layer summaries of a routing trace (anyexperts.moe.trace), for tools and pictures.

summarise() gives, per record, mean K, real, virtual and dropped experts per token, the
histogram of K, importance mean/std (NaN for routers without importance) and the
correlation of importance with the position in the sequence. Records that carry "tokens"
(the trainer's traces: input ids in the layer's [sequence, batch] order, with "seq_length")
also get "real_by_token_class", "k_by_token_class", "virtual_by_token_class" (means) and
"tokens_by_class" (counts; only classes with at least one token), by byte-tokenizer class:
    space        byte 32 and tab
    newline      10 and 13
    punctuation  ASCII punctuation (string.punctuation)
    word_start   an ASCII letter at position 0 or after a non-letter of the same sequence
    word_inner   an ASCII letter after a letter of the same sequence
    other        digits, non-ASCII bytes, end-of-document and anything else
With another tokenizer the classes mean nothing.
"""

from __future__ import annotations

import string

import torch


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return (a @ b).item() / denom if denom > 0 else float("nan")


CLASS_NAMES = ("space", "newline", "punctuation", "word_start", "word_inner", "other")
SPACE, NEWLINE, PUNCTUATION, WORD_START, WORD_INNER, OTHER = range(len(CLASS_NAMES))
_PUNCTUATION_BYTES = torch.tensor([ord(c) for c in string.punctuation], dtype=torch.long)


def token_classes(tokens_SB: torch.Tensor) -> torch.Tensor:
    """Byte-tokenizer class ids (indices into CLASS_NAMES) of tokens [S, B], sequence
    axis first (a 1-D tensor is one sequence); returns int64 of the same shape.
    Word starts and word inners look at the previous token along the sequence axis."""
    tokens = torch.as_tensor(tokens_SB).long()
    if tokens.dim() not in (1, 2):
        raise ValueError(f"token_classes wants tokens [S, B] or [S], not {tuple(tokens.shape)}")
    t = tokens if tokens.dim() == 2 else tokens.reshape(-1, 1)
    letter = ((t >= ord("A")) & (t <= ord("Z"))) | ((t >= ord("a")) & (t <= ord("z")))
    prev_letter = torch.zeros_like(letter)
    prev_letter[1:] = letter[:-1]
    classes = torch.full_like(t, OTHER)
    classes[(t == ord(" ")) | (t == ord("\t"))] = SPACE
    classes[(t == ord("\n")) | (t == ord("\r"))] = NEWLINE
    classes[torch.isin(t, _PUNCTUATION_BYTES)] = PUNCTUATION
    classes[letter & ~prev_letter] = WORD_START
    classes[letter & prev_letter] = WORD_INNER
    return classes.reshape(tokens.shape)


def _by_token_class(values: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    counts = torch.bincount(classes, minlength=len(CLASS_NAMES))
    sums = torch.bincount(classes, weights=values.double(), minlength=len(CLASS_NAMES))
    return {name: (sums[c] / counts[c]).item() for c, name in enumerate(CLASS_NAMES) if counts[c] > 0}


def summarise(trace: list[dict]) -> list[dict]:
    rows = []
    for record in trace:
        num_experts = int(record["num_experts"])
        expert_ids = record["expert_ids"]
        virtual = record["virtual_mask"].bool()
        dropped = record["dropped_mask"].bool()
        real = (expert_ids >= 0) & (expert_ids < num_experts) & ~virtual
        k = record["k"]
        # The rival routers (top-p, ReMoE) have no importance: their rows show NaN there.
        importance = record["importance"].float() if "importance" in record else torch.full((k.numel(),), float("nan"))
        real_per_token = (real & ~dropped).sum(1)
        row = {
            "layer": int(record["layer_number"]),
            "tokens": int(k.numel()),
            "mean_k": k.float().mean().item(),
            "real_per_token": real_per_token.float().mean().item(),
            "virtual_per_token": virtual.sum(1).float().mean().item(),
            "dropped_per_token": dropped.sum(1).float().mean().item(),
            "importance_mean": importance.mean().item(),
            "importance_std": importance.std().item() if importance.numel() > 1 else 0.0,
            "k_histogram": torch.bincount(k.long()).tolist(),
        }
        if "seq_length" in record:
            seq_length = int(record["seq_length"])
            batch = k.numel() // seq_length
            positions = torch.arange(seq_length).repeat_interleave(batch)
            row["corr_importance_position"] = _correlation(importance, positions)
        if "tokens" in record:
            tokens = torch.as_tensor(record["tokens"]).reshape(-1)
            seq_length = int(record.get("seq_length", tokens.numel()))
            if tokens.numel() != k.numel() or seq_length <= 0 or tokens.numel() % seq_length:
                raise ValueError(f"layer {row['layer']}: {tokens.numel()} tokens do not match {k.numel()} "
                                 f"routed tokens in sequences of {seq_length}")
            classes = token_classes(tokens.reshape(seq_length, -1)).reshape(-1)
            counts = torch.bincount(classes, minlength=len(CLASS_NAMES))
            row["real_by_token_class"] = _by_token_class(real_per_token, classes)
            row["k_by_token_class"] = _by_token_class(k, classes)
            row["virtual_by_token_class"] = _by_token_class(virtual.sum(1), classes)
            row["tokens_by_class"] = {name: int(counts[c]) for c, name in enumerate(CLASS_NAMES) if counts[c] > 0}
        rows.append(row)
    return rows
