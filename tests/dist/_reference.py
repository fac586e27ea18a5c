"""Test data and the global objectives written out by hand in plain PyTorch (no DeepSpeed, no algo
reducers), for comparison with the gradients the ZeRO-3 engines produce."""
from __future__ import annotations

import math

import torch

from rlhf_ds.batch import Experience

CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 3.0
KL_COEF, ENTROPY_COEF, VALUE_CLIP, VALUE_COEF = 0.1, 0.01, 0.2, 0.5
MAX_SEQ_LEN = 6  # L of seq_mean_token_sum_norm (= R)


def make_experience(vocab: int, seed: int = 0, num_rows: int = 8, prompt_len: int = 4,
                    response_len: int = MAX_SEQ_LEN) -> Experience:
    """Random rows with varied prompt and response lengths (one empty response); 2 rows per prompt."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(4, vocab, (num_rows, prompt_len), generator=g)
    prompt_mask = torch.ones(num_rows, prompt_len, dtype=torch.long)
    for i in range(num_rows):
        pad = i % 3                                   # left padding 0, 1 or 2
        prompt_ids[i, :pad], prompt_mask[i, :pad] = 0, 0
    lengths = [response_len, 3, 1, 5, 0, 4, 2, response_len][:num_rows]
    response_ids = torch.randint(4, vocab, (num_rows, response_len), generator=g)
    response_mask = torch.zeros(num_rows, response_len)
    for i, n in enumerate(lengths):
        response_mask[i, :n] = 1.0
        response_ids[i, n:] = 0
    return Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, group_ids=torch.arange(num_rows) // 2)


def response_logits(model, exp: Experience) -> torch.Tensor:
    out = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, exp.prompt_len - 1: exp.prompt_len + exp.response_len - 1]


def fill_actor_fields(model, exp: Experience, seed: int = 1) -> Experience:
    """old / ref log-probs near the model's own (so ratios straddle the clip range), token advantages."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logprobs = torch.log_softmax(response_logits(model, exp).float(), -1).gather(
            -1, exp.response_ids.unsqueeze(-1)).squeeze(-1)
    shape = logprobs.shape
    return exp.replace(old_logprobs=logprobs + 0.3 * torch.randn(shape, generator=g),
                       ref_logprobs=logprobs + 0.5 * torch.randn(shape, generator=g),
                       advantages=torch.randn(shape, generator=g) * exp.response_mask)


def fill_critic_fields(exp: Experience, seed: int = 2) -> Experience:
    g = torch.Generator().manual_seed(seed)
    shape = exp.response_mask.shape
    return exp.replace(values=0.3 * torch.randn(shape, generator=g), returns=torch.randn(shape, generator=g))


def hand_weights(mask: torch.Tensor, mode: str, group_ids: torch.Tensor, micro: int) -> torch.Tensor:
    """Reduction weights from the table of docs/design.md#loss-reduction-by-pre-scaled-advantages, with loops (float64)."""
    rows, cols = mask.shape
    n = [float(mask[i].sum()) for i in range(rows)]
    total = sum(n)
    chunks = math.ceil(rows / micro)
    groups = sorted(set(group_ids.tolist()))
    w = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        if n[i] == 0:
            continue
        if mode == "token_mean":
            divisor = total
        elif mode == "token_mean_legacy":
            k = i // micro
            divisor = chunks * sum(n[j] for j in range(k * micro, min(rows, (k + 1) * micro)))
        elif mode == "sequence_mean":
            divisor = rows * n[i]
        elif mode == "seq_mean_token_sum_norm":
            divisor = rows * MAX_SEQ_LEN
        elif mode == "prompt_mean":
            divisor = len(groups) * sum(n[j] for j in range(rows) if group_ids[j] == group_ids[i])
        else:
            raise ValueError(mode)
        for t in range(cols):
            if mask[i, t]:
                w[i, t] = 1.0 / divisor
    return w


def actor_objective(model, exp: Experience, weights: torch.Tensor) -> torch.Tensor:
    """sum w * (ppo_clip_dual(A) + kl_coef * k3 - entropy_coef * H), unscaled advantages A."""
    logits = response_logits(model, exp).float()
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, exp.response_ids.unsqueeze(-1)).squeeze(-1)
    adv = exp.advantages
    ratio = torch.exp(logprobs - exp.old_logprobs)
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    surrogate = torch.where(adv < 0, torch.minimum(surrogate, -DUAL_CLIP * adv), surrogate)
    x = logprobs - exp.ref_logprobs
    kl = torch.exp(-x) + x - 1
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    w = weights.float()
    return (w * (surrogate + KL_COEF * kl - ENTROPY_COEF * entropy)).sum()


def critic_objective(model, exp: Experience, weights: torch.Tensor) -> torch.Tensor:
    """value_coef * sum w * 0.5 * max((V - G)^2, (V_clipped - G)^2)."""
    values = response_logits(model, exp).float()
    clipped = exp.values + (values - exp.values).clamp(-VALUE_CLIP, VALUE_CLIP)
    per_token = 0.5 * torch.maximum((values - exp.returns) ** 2, (clipped - exp.returns) ** 2)
    return VALUE_COEF * (weights.float() * per_token).sum()


def reference_grads(model, objective) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective.backward()
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def max_rel_diff(got: dict, want: dict) -> float:
    """max over parameters of ||got - want||_inf / ||want||_inf (absolute where want is all zero)."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    worst = 0.0
    for name, ref in want.items():
        diff = (got[name].double() - ref.double()).abs().max().item()
        scale = ref.abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
