"""Per-token side information for the MoE layers (the modality of every token), as one
small object that travels with each forward.

A megatron-core GPTModel forward takes token ids, positions and masks; nothing per token
reaches its MoE layers. `TokenInfo` is what they read beside the hidden states:

    from anyexperts.moe import token_info
    info = token_info.TokenInfo.from_tokens(tokens_BS, modality_of_tokens)
    with token_info.use(info):                      # one micro-batch's forward
        loss = model(tokens_BS, position_ids, None, labels=labels)

or once for every forward of a model, taken from the input ids it is called with:

    token_info.attach(gpt_model, modality_of_tokens)  # forward hooks on the model

`modality_fn(tokens) -> modality index` (into `names`, default MODALITY_NAMES) should be a
pure function of the token ids (e.g. of id ranges, as anyexperts.data.digits does): the
modalities then line up with the tokens after any packing, micro-batching, expert
parallelism or resume, and nothing needs saving in checkpoints. Each rank derives them from
its own tokens; they never cross ranks (routing statistics and budget terms are computed
before dispatch, where every row is a token of this rank).

The layers see hidden states [S, B, H] as rows s * B + b; TokenInfo keeps modality_T in that
order. A layer whose row count differs from the info's (sequence or context parallelism
split the sequence, or a pipeline stage without input ids) raises ValueError rather than
guess. The info is read in the layer's forward only: with activation recomputation the
recomputed forward runs outside the `use` block and sees no info, so per-modality budget
terms need recomputation off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

MODALITY_NAMES = ("text", "image")

_STACK: list["TokenInfo"] = []


@dataclass(frozen=True)
class TokenInfo:
    modality_T: torch.Tensor  # int64 [S * B], rows in the layers' order s * B + b
    names: tuple[str, ...] = MODALITY_NAMES

    @classmethod
    def from_tokens(cls, tokens_BS: torch.Tensor, modality_fn: Callable[[torch.Tensor], torch.Tensor],
                    names: tuple[str, ...] = MODALITY_NAMES) -> "TokenInfo":
        """From token ids [B, S] (megatron's input layout)."""
        if tokens_BS.dim() != 2:
            raise ValueError(f"tokens must be [batch, sequence], got shape {tuple(tokens_BS.shape)}")
        modality_BS = modality_fn(tokens_BS)
        if modality_BS.shape != tokens_BS.shape:
            raise ValueError(f"modality_fn returned shape {tuple(modality_BS.shape)} for tokens "
                             f"{tuple(tokens_BS.shape)}; it must return one modality index per token")
        return cls(modality_T=modality_BS.t().reshape(-1).to(torch.int64), names=tuple(names))

    def modality_for(self, num_rows: int, device: torch.device) -> torch.Tensor:
        if self.modality_T.shape[0] != num_rows:
            raise ValueError(
                f"token info holds {self.modality_T.shape[0]} tokens but the MoE layer sees {num_rows} rows; "
                "per-token side information needs whole sequences on each rank (no sequence or context "
                "parallelism) and the input ids on every pipeline stage")
        return self.modality_T.to(device, non_blocking=True)


def current() -> Optional[TokenInfo]:
    """The innermost TokenInfo set with `use` (or by `attach`'s hooks), None outside."""
    return _STACK[-1] if _STACK else None


@contextlib.contextmanager
def use(info: Optional[TokenInfo]) -> Iterator[Optional[TokenInfo]]:
    """The MoE layers read `info` in every forward inside the block (None: no info)."""
    _STACK.append(info)
    try:
        yield info
    finally:
        _STACK.pop()


def attach(model: torch.nn.Module, modality_fn: Callable[[torch.Tensor], torch.Tensor],
           names: tuple[str, ...] = MODALITY_NAMES) -> tuple:
    """Forward hooks on `model` (a GPTModel, whose first argument is input_ids [B, S]) that
    set the TokenInfo of its input ids for the length of each forward; returns the hook handles."""

    def push(_module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        _STACK.append(None if input_ids is None else TokenInfo.from_tokens(input_ids, modality_fn, names))

    def pop(_module, _args, _kwargs, _output):
        _STACK.pop()

    return (model.register_forward_pre_hook(push, with_kwargs=True),
            model.register_forward_hook(pop, with_kwargs=True, always_call=True))
