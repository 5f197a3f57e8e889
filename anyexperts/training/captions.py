"""Caption metrics of image-text validation (data=digits), from the validation forwards'
logits, so they cost no extra forward:

- `caption_accuracy`: share of captions whose digit is predicted right (argmax of the logits)
  at the token right after the caption prefix "digit " (a prefix cut by the start of a
  sample is not counted);
- `caption_loss`: mean loss over the caption tokens (the labels of text modality: the
  caption bytes and eod), beside val_loss which is dominated by the pixels;
- `caption_digit_loss`: mean loss on the digit token alone.
Sums over this rank's batches; `collect` reduces over the data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from anyexperts.data import digits


def logits_and_per_token_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, S, V], per-token loss [B, S]): megatron's GPTModel returns logits when given no labels."""
    logits_BSV = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    per_token_loss_BS = F.cross_entropy(logits_BSV.float().transpose(1, 2), batch["labels"], reduction="none")
    return logits_BSV, per_token_loss_BS


class CaptionMetrics:
    def __init__(self, device: torch.device) -> None:
        # [right digits, digit positions, caption loss sum, caption tokens, digit loss sum]
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, batch: dict, logits_BSV: torch.Tensor, per_token_loss_BS: torch.Tensor) -> None:
        mask_BS = batch["loss_mask"] > 0
        at_digit_BS = digits.caption_positions(batch["tokens"]) & mask_BS
        caption_BS = (digits.modality_of_tokens(batch["labels"]) == digits.TEXT) & mask_BS
        right_BS = (logits_BSV.argmax(-1) == batch["labels"]) & at_digit_BS
        loss_BS = per_token_loss_BS.double()
        self.sums += torch.stack([right_BS.sum().double(), at_digit_BS.sum().double(), loss_BS[caption_BS].sum(),
                                  caption_BS.sum().double(), loss_BS[at_digit_BS].sum()])

    def collect(self, group=None) -> dict[str, float]:
        sums = self.sums.clone()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        right, num_digits, caption_loss, num_caption, digit_loss = sums.tolist()
        if num_digits == 0:
            return {}
        return {"caption_accuracy": right / num_digits, "caption_loss": caption_loss / max(num_caption, 1),
                "caption_digit_loss": digit_loss / num_digits, "caption_count": num_digits}
