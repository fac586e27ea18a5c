"""The loss and gradient contract (docs/design.md#the-loss-and-gradient-contract): any dp x micro-batch layout gives the mode's objective.

One mini-batch of 12 sequences with uneven response lengths (one of them empty) and uneven prompt
groups is scored by a tiny differentiable model (shared policy and value weights). For every
reduction mode and policy loss, and for every layout dp in {1, 2, 4} x micro-batch in {1, 2, 3, 5}:

* advantages are pre-scaled once on the whole mini-batch (``scale_advantages``);
* each rank backwards ``piece_loss * dp`` per micro-batch (no gradient-accumulation division), and the
  ranks' gradients are averaged, which is what ZeRO's reduce-scatter does;
* the result must equal the gradient of the mode's objective, written here from its definition with
  explicit loops over sequences, chunks and groups (independent of the scaling code);
* the loss reported through the metric reducers must equal the objective.

The negative control shows the per-micro-batch mean reduction is not layout invariant.
"""
import pytest
import torch

from rlhf_ds.algo import (
    LOSS_REDUCTIONS,
    Metric,
    MetricKind,
    combine_rank_metrics,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    reduce_metrics_across_microbatches,
    scale_advantages,
    truncated_is_weights,
    value_loss,
)

B, R, V, D = 12, 5, 7, 4
LENGTHS = [5, 3, 0, 1, 4, 2, 5, 1, 3, 2, 4, 5]  # row 2 is an empty response
GROUP_IDS = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3]  # uneven groups, crossing dp shard boundaries
LOSS_NORM_LEN = 6
KL_COEF, ENT_COEF, VF_COEF = 0.1, 0.01, 0.5
CLIP = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
VALUE_CLIP, TIS_CAP = 0.2, 2.0
LAYOUTS = [(dp, micro) for dp in (1, 2, 4) for micro in (1, 2, 3, 5)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny ops: intra-op threads only add synchronisation on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Problem:
    """Fixed token features; the policy and value heads are the parameters whose gradients we compare."""

    def __init__(self, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=dtype)

        self.features = randn(B, R, D)
        self.policy_w = randn(D, V).requires_grad_()
        self.value_w = randn(D).requires_grad_()
        self.tokens = torch.randint(V, (B, R), generator=gen)
        self.mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in LENGTHS], dtype=dtype)
        self.group_ids = torch.tensor(GROUP_IDS)
        with torch.no_grad():
            logprobs, _, values = self.forward(slice(None))
        self.old_logprobs = logprobs + 0.5 * randn(B, R)
        self.rollout_logprobs = self.old_logprobs + 0.5 * randn(B, R)
        self.ref_logprobs = logprobs + 0.3 * randn(B, R)
        self.advantages = randn(B, R) * self.mask
        self.old_values = values + 0.3 * randn(B, R)
        self.returns = randn(B, R)
        self.is_weights = truncated_is_weights(self.old_logprobs, self.rollout_logprobs, TIS_CAP, self.mask)

    def forward(self, rows):
        """-> logprobs [b, R] of the sampled tokens, logits [b, R, V], values [b, R]."""
        logits = self.features[rows] @ self.policy_w
        logprobs = torch.log_softmax(logits, -1).gather(-1, self.tokens[rows].unsqueeze(-1)).squeeze(-1)
        return logprobs, logits, self.features[rows] @ self.value_w

    def params(self):
        return [self.policy_w, self.value_w]


# ---- the production path: pieces of a layout -------------------------------------------------------------
def piece_loss(problem, rows, scaled, weights, loss_name):
    """policy (scaled advantages, masked sum) + KL, entropy and value terms reduced with the weights."""
    logprobs, logits, values = problem.forward(rows)
    mask, w = problem.mask[rows], weights[rows]
    policy, _ = policy_loss(
        loss_name, logprobs, problem.old_logprobs[rows], scaled[rows], mask, **CLIP, is_weights=problem.is_weights[rows]
    )
    kl = kl_penalty(logprobs, problem.ref_logprobs[rows], "k3")
    entropy = entropy_from_logits(logits, chunk=4)
    vloss = value_loss(values, problem.old_values[rows], problem.returns[rows], VALUE_CLIP)
    return (
        (policy * mask).sum()
        + KL_COEF * (kl * w).sum()
        - ENT_COEF * (entropy * w).sum()
        + VF_COEF * (vloss * w).sum()
    )


def layout_pieces(dp, micro):
    """Consecutive dp shards, each cut into consecutive micro-batches of ``micro`` rows (last may be short)."""
    shard = B // dp
    pieces = []
    for rank in range(dp):
        end = (rank + 1) * shard
        pieces.append([list(range(start, min(start + micro, end))) for start in range(rank * shard, end, micro)])
    return pieces


def run_layout(problem, mode, loss_name, dp, micro):
    """-> (gradients after the DP average, loss reported through the metric reducers)."""
    scaled, weights = scale_advantages(
        problem.advantages,
        problem.mask,
        mode,
        group_ids=problem.group_ids,
        micro_batch_size=micro,
        loss_norm_len=LOSS_NORM_LEN,
    )
    rank_grads, rank_metrics = [], []
    for pieces in layout_pieces(dp, micro):
        for param in problem.params():
            param.grad = None
        micro_metrics = []
        for rows in pieces:
            loss = piece_loss(problem, rows, scaled, weights, loss_name)
            (loss * dp).backward()  # local masked sum * dp_size, no gradient-accumulation division
            micro_metrics.append({"loss": Metric(loss.item(), MetricKind.SUM)})
        rank_grads.append([param.grad.clone() for param in problem.params()])
        rank_metrics.append(reduce_metrics_across_microbatches(micro_metrics))
    grads = [torch.stack(per_rank).mean(0) for per_rank in zip(*rank_grads, strict=True)]  # the DP all-reduce (average)
    return grads, combine_rank_metrics(rank_metrics)["loss"].value


# ---- the reference: each mode's objective from its definition -------------------------------------------
def reference_token_loss(problem, loss_name):
    """[B, R] per-token loss with raw advantages, every term written out again."""
    logprobs, logits, values = problem.forward(slice(None))
    adv = problem.advantages
    if loss_name == "ppo":
        ratio = torch.exp(logprobs - problem.old_logprobs)
    else:
        seq_log_ratio = torch.stack(
            [
                (logprobs[i, :n] - problem.old_logprobs[i, :n]).sum() / n if n else logprobs.new_zeros(())
                for i, n in enumerate(LENGTHS)
            ]
        ).detach()
        ratio = torch.exp(seq_log_ratio.unsqueeze(1) + logprobs - logprobs.detach())
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP["clip_low"], 1 + CLIP["clip_high"]))
    surrogate = torch.where(adv < 0, torch.minimum(surrogate, -CLIP["dual_clip"] * adv), surrogate)
    is_weights = torch.exp(problem.old_logprobs - problem.rollout_logprobs).clamp(max=TIS_CAP)
    log_ref_ratio = problem.ref_logprobs - logprobs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    log_p = torch.log_softmax(logits, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    clipped_values = problem.old_values + (values - problem.old_values).clamp(-VALUE_CLIP, VALUE_CLIP)
    vloss = 0.5 * torch.maximum((values - problem.returns) ** 2, (clipped_values - problem.returns) ** 2)
    return surrogate * is_weights + KL_COEF * kl - ENT_COEF * entropy + VF_COEF * vloss


def reference_objective(token_loss, mode, micro):
    def seq_sum(i):
        return token_loss[i, : LENGTHS[i]].sum()

    def mean_over(row_sets):  # mean over sets of (token sum / token count), an empty set counting 0
        means = []
        for rows in row_sets:
            tokens = sum(LENGTHS[i] for i in rows)
            means.append(sum(seq_sum(i) for i in rows) / tokens if tokens else token_loss.new_zeros(()))
        return sum(means) / len(means)

    if mode == "token_mean":
        return mean_over([range(B)])
    if mode == "token_mean_legacy":
        return mean_over([range(s, min(s + micro, B)) for s in range(0, B, micro)])
    if mode == "sequence_mean":
        return mean_over([[i] for i in range(B)])
    if mode == "seq_mean_token_sum_norm":
        return sum(seq_sum(i) / LOSS_NORM_LEN for i in range(B)) / B
    assert mode == "prompt_mean"
    return mean_over([[i for i in range(B) if GROUP_IDS[i] == g] for g in sorted(set(GROUP_IDS))])


def reference(problem, mode, loss_name, micro):
    objective = reference_objective(reference_token_loss(problem, loss_name), mode, micro)
    return objective, torch.autograd.grad(objective, problem.params())


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


# ---- tests --------------------------------------------------------------------------------------------------
def test_problem_exercises_every_branch():
    """Without clipped, dual-clipped, IS-capped tokens and an empty row, the invariance would prove less."""
    problem = Problem(torch.float64)
    logprobs, _, _ = problem.forward(slice(None))
    kept = problem.mask.bool()
    ratio = torch.exp(logprobs - problem.old_logprobs).detach()[kept]
    adv = problem.advantages[kept]
    assert ((adv > 0) & (ratio > 1 + CLIP["clip_high"])).any()
    assert ((adv < 0) & (ratio < 1 - CLIP["clip_low"])).any()
    assert ((adv < 0) & (ratio > CLIP["dual_clip"])).any()
    assert ((ratio > 1 - CLIP["clip_low"]) & (ratio < 1 + CLIP["clip_high"])).any()
    assert (problem.is_weights[kept] == TIS_CAP).any() and (problem.is_weights[kept] < 1).any()
    _, stats = policy_loss("gspo", logprobs, problem.old_logprobs, problem.advantages, problem.mask, **CLIP)
    assert 0 < stats["clip_frac"].item() < 1
    assert 0 in LENGTHS and len(set(LENGTHS)) > 3


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("loss_name", ["ppo", "gspo"])
@pytest.mark.parametrize("mode", LOSS_REDUCTIONS)
def test_every_layout_gives_the_objective_gradient_and_loss(mode, loss_name, dtype, tol):
    problem = Problem(dtype)
    for dp, micro in LAYOUTS:
        objective, want = reference(problem, mode, loss_name, micro)
        grads, reported = run_layout(problem, mode, loss_name, dp, micro)
        for got, ref in zip(grads, want, strict=True):
            assert relative_error(got, ref) < tol, (mode, loss_name, dp, micro)
        assert reported == pytest.approx(objective.item(), rel=tol), (mode, loss_name, dp, micro)


def test_modes_are_different_objectives():
    """Guards the test above against a reference that ignores its mode."""
    problem = Problem(torch.float64)
    token_loss = reference_token_loss(problem, "ppo").detach()
    values = [reference_objective(token_loss, mode, 2).item() for mode in LOSS_REDUCTIONS]
    assert len({round(v, 12) for v in values}) == len(LOSS_REDUCTIONS)


def mean_reduced_grads(problem, dp, micro):
    """Negative control: each micro-batch takes its own token mean, averaged over micro-batches and ranks."""
    rank_grads = []
    for pieces in layout_pieces(dp, micro):
        for param in problem.params():
            param.grad = None
        for rows in pieces:
            token_sum = piece_loss(problem, rows, problem.advantages, problem.mask, "ppo")
            (token_sum / problem.mask[rows].sum().clamp(min=1) / len(pieces)).backward()
        rank_grads.append([param.grad.clone() for param in problem.params()])
    return [torch.stack(per_rank).mean(0) for per_rank in zip(*rank_grads, strict=True)]


def test_negative_control_per_micro_batch_mean_depends_on_layout():
    problem = Problem(torch.float64)
    _, want = reference(problem, "token_mean", "ppo", micro=B)
    # one piece holding the whole mini-batch: the mean reduction is the token mean
    whole = mean_reduced_grads(problem, 1, B)
    assert all(relative_error(g, w) < 1e-10 for g, w in zip(whole, want, strict=True))
    # uneven lengths: any real split moves the gradient away from it, and layouts disagree
    split = {layout: mean_reduced_grads(problem, *layout) for layout in [(2, 1), (1, 3), (4, 2)]}
    for grads in split.values():
        assert relative_error(grads[0], want[0]) > 1e-2
    assert relative_error(split[(2, 1)][0], split[(1, 3)][0]) > 1e-2
