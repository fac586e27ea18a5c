"""The one typed batch record that flows through the RL step.

A sequence is ``prompt ++ response``: the prompt left-padded to P tokens, the response right-padded to R.
Everything per token (log-probs, values, advantages, masks, weights) lives on the R response positions;
the logits that score response token ``t`` come from position ``P + t - 1`` of the full sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

# Fields holding one tensor row per sequence; everything else is metadata.
_TENSOR_FIELDS = (
    "prompt_ids", "prompt_mask", "response_ids", "response_mask", "group_ids", "rewards",
    "rollout_logprobs", "old_logprobs", "ref_logprobs", "values", "advantages", "returns",
    "token_weights",
)


@dataclass
class Experience:
    prompt_ids: torch.Tensor                          # [B, P] long, left-padded
    prompt_mask: torch.Tensor                         # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor                        # [B, R] long, right-padded
    response_mask: torch.Tensor                       # [B, R] float, 1.0 on generated tokens (eos included)
    group_ids: torch.Tensor                           # [B] long, prompt index; a group's rows are adjacent
    rewards: Optional[torch.Tensor] = None            # [B] sequence score
    rollout_logprobs: Optional[torch.Tensor] = None   # [B, R] log-probs reported by the rollout engine
    old_logprobs: Optional[torch.Tensor] = None       # [B, R] actor log-probs before the update
    ref_logprobs: Optional[torch.Tensor] = None       # [B, R] reference-model log-probs
    values: Optional[torch.Tensor] = None             # [B, R] critic values before the update
    advantages: Optional[torch.Tensor] = None         # [B, R] raw advantages (algo.compute_advantages)
    returns: Optional[torch.Tensor] = None            # [B, R] critic targets
    token_weights: Optional[torch.Tensor] = None      # [B, R] loss-reduction weights of the row's mini-batch
                                                      # (algo.token_weights; 0 on padding), shared by roles

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_len(self) -> int:
        return self.response_ids.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P+R] full token ids."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P+R] long, 1 on real tokens (prompt tokens and generated tokens)."""
        return torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, P+R] positions counted from each row's first real token (left padding gets 0)."""
        mask = self.attention_mask
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_FIELDS if getattr(self, name) is not None}

    def require(self, name: str) -> torch.Tensor:
        """The optional field ``name``, which the caller needs: a ValueError naming it when it is None."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"Experience has no {name}, which this step needs")
        return value

    def replace(self, **changes) -> "Experience":
        return replace(self, **changes)

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> "Experience":
        """Rows picked by a slice, a list of indices or an index tensor."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, **{name: value[index] for name, value in self.tensors().items()})

    def split(self, sizes: Sequence[int]) -> list["Experience"]:
        """Consecutive pieces of the given numbers of rows (they must add up to len(self))."""
        if sum(sizes) != len(self):
            raise ValueError(f"split sizes {list(sizes)} do not add up to the batch size {len(self)}")
        pieces, start = [], 0
        for size in sizes:
            pieces.append(self.select(slice(start, start + size)))
            start += size
        return pieces

    def chunk(self, size: int) -> list["Experience"]:
        """Consecutive pieces of ``size`` rows (the last may be shorter)."""
        n = len(self)
        return self.split([min(size, n - start) for start in range(0, n, size)])

    def trimmed(self) -> "Experience":
        """The same rows without the columns that are padding in every row: leading prompt columns and
        trailing response columns. Real tokens keep their positions (``position_ids`` count from each
        row's first real token) and causal attention never sees the dropped columns, so every real
        token's outputs are unchanged, up to floating-point summation order."""
        first = int(self.prompt_mask.any(dim=0).long().argmax()) if self.prompt_mask.any() else self.prompt_len - 1
        first = min(first, self.prompt_len - 1)   # keep at least one prompt column: it scores response token 0
        real = self.response_mask.any(dim=0).nonzero()
        length = int(real[-1]) + 1 if len(real) else 1
        if first == 0 and length == self.response_len:
            return self
        changes = {name: value[:, :length] for name, value in self.tensors().items()
                   if value.dim() == 2 and name not in ("prompt_ids", "prompt_mask")}
        changes.update(prompt_ids=self.prompt_ids[:, first:], prompt_mask=self.prompt_mask[:, first:])
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> "Experience":
        return replace(self, **{name: value.to(device) for name, value in self.tensors().items()})

    @staticmethod
    def cat(pieces: Sequence["Experience"]) -> "Experience":
        """Row-wise concatenation; pieces must share P and R and carry the same optional fields."""
        if not pieces:
            raise ValueError("Experience.cat needs at least one piece")
        first = pieces[0]
        names = set(first.tensors())
        for piece in pieces[1:]:
            if set(piece.tensors()) != names:
                raise ValueError(f"cannot concatenate pieces with fields {sorted(names)} and "
                                 f"{sorted(piece.tensors())}")
        return replace(first, **{name: torch.cat([getattr(p, name) for p in pieces]) for name in names})


def pad_responses(responses: Sequence[Sequence[int]], pad_id: int, length: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists. Returns (ids [B, R] long, mask [B, R] float)."""
    length = max([len(r) for r in responses] + [1]) if length is None else length
    ids = torch.full((len(responses), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(responses), length), dtype=torch.float32)
    for i, tokens in enumerate(responses):
        tokens = list(tokens)[:length]
        ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, :len(tokens)] = 1.0
    return ids, mask


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists. Returns (ids [B, P] long, mask [B, P] long)."""
    length = max([len(p) for p in prompts] + [1]) if length is None else length
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, tokens in enumerate(prompts):
        tokens = list(tokens)[-length:]
        if tokens:
            ids[i, length - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            mask[i, length - len(tokens):] = 1
    return ids, mask


__all__ = ["Experience", "pad_prompts", "pad_responses"]


def packed_micro_batches(exp: Experience, micro_batch_size: int, by_length: bool = True
                         ) -> list[tuple[torch.Tensor, Experience]]:
    """Micro-batches of rows of similar length, each cut to its own longest prompt and response
    (``Experience.trimmed``), with the indices of their rows in ``exp``: padding is not computed.

    Which rows share a micro-batch does not change a loss of per-token weights (docs/design.md#the-loss-and-gradient-contract: the sum over
    micro-batches is the mini-batch objective), so rows are grouped by length, longest first.
    ``by_length=False`` keeps consecutive rows together: ``token_mean_legacy`` weighs each micro-batch by
    its own token count, computed for consecutive rows."""
    if by_length:
        order = torch.argsort(exp.attention_mask.sum(dim=1), descending=True, stable=True)
    else:
        order = torch.arange(len(exp))
    return [(idx, exp.select(idx).trimmed()) for idx in order.split(micro_batch_size)]


def padded_fraction(exp: Experience, micro_batch_size: int, ranks: int, by_length: bool = True) -> float:
    """Share of the tokens computed that are padding, once each rank's shard is cut into
    ``packed_micro_batches`` (what the forward and backward passes actually process)."""
    computed = 0
    for shard in exp.split([len(exp) // ranks + (r < len(exp) % ranks) for r in range(ranks)]):
        for _, micro in packed_micro_batches(shard, micro_batch_size, by_length):
            computed += micro.input_ids.numel()
    return 1.0 - exp.attention_mask.sum().item() / max(computed, 1)
