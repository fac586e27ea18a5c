"""Jobs of the SFT / reward-model gradient tests (run on every rank of a spawned gloo group, see
_launch.run_ranks), their test data, and the stage objectives written out by hand in plain PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _reference as ref
from _jobs import full_grads
from rlhf_ds.algo import token_weights
from rlhf_ds.algo.supervised import pair_weights
from rlhf_ds.batch import Experience, packed_micro_batches
from rlhf_ds.cluster.dispatch import split_by_rank
from rlhf_ds.config import load_config
from rlhf_ds.data.preferences import PreferenceBatch
from rlhf_ds.engine import dist
from rlhf_ds.engine.step import accumulate_gradients, discard_gradients
from rlhf_ds.workers.rm import RmWorker, reward_model_loss
from rlhf_ds.workers.sft import SftWorker, sft_loss

CHOSEN_LENGTHS = [6, 3, 1, 5, 2, 4, 2, 6]
REJECTED_LENGTHS = [2, 5, 6, 1, 3, 3, 4, 6]


# ----------------------------------------------------------------------------- data

def sft_batch(vocab: int, num_rows: int = 8) -> Experience:
    """Rows of varied prompt / answer lengths (one empty answer) with the token_mean weights of the whole
    mini-batch, as ``trainer.sft_stage.sft_minibatch`` sets them."""
    exp = ref.make_experience(vocab, num_rows=num_rows)
    return exp.replace(token_weights=token_weights(exp.response_mask, "token_mean"))


def _responses(vocab: int, lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
        ids[i, n:] = 0
    return ids, mask


def preference_pairs(vocab: int) -> PreferenceBatch:
    """8 pairs: shared (left-padded) prompts, chosen and rejected responses of different lengths, and the
    pair weights 1/8 of the whole mini-batch, as ``trainer.rm_stage.pairs_minibatch`` sets them."""
    base = ref.make_experience(vocab, seed=3)
    halves = []
    for lengths, seed in ((CHOSEN_LENGTHS, 4), (REJECTED_LENGTHS, 5)):
        ids, mask = _responses(vocab, lengths, base.response_len, seed)
        halves.append(base.replace(response_ids=ids, response_mask=mask))
    return PreferenceBatch(*halves, pair_weights=pair_weights(len(base)))


# ----------------------------------------------------------------------------- objectives by hand

def sft_objective(model, exp: Experience) -> torch.Tensor:
    """Token mean over the whole batch of -log p(answer token)."""
    logp = torch.log_softmax(ref.response_logits(model, exp).float(), -1)
    token_logp = logp.gather(-1, exp.response_ids.unsqueeze(-1)).squeeze(-1)
    return -(token_logp * exp.response_mask).sum() / exp.response_mask.sum()


def _last_token_scores(value_model, exp: Experience) -> torch.Tensor:
    values = value_model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids)
    last = [exp.prompt_len + int(n) - 1 for n in exp.response_mask.sum(1)]
    return torch.stack([values[i, t] for i, t in enumerate(last)]).float()


def rm_objective(value_model, pairs: PreferenceBatch) -> torch.Tensor:
    """Mean over the pairs of -log sigmoid(r_chosen - r_rejected)."""
    chosen, rejected = _last_token_scores(value_model, pairs.chosen), _last_token_scores(value_model, pairs.rejected)
    return -F.logsigmoid(chosen - rejected).mean()


# ----------------------------------------------------------------------------- the job

def _grads(worker, loss_fn, batch, micro: int, *, even: bool = True, ds_default: bool = False) -> dict:
    """This rank's shard (cut as the groups cut it), accumulated with our semantics or DeepSpeed's default
    (loss / accumulation steps, gradients averaged over ranks); the full gradients, then dropped."""
    engine = worker.engine
    shard = split_by_rank(batch, dist.dp_size(), even=even)[dist.dp_rank()]
    # as the workers cut them: SFT rows packed by length (padding cut), pairs consecutive
    pieces = ([piece for _, piece in packed_micro_batches(shard, micro)] if isinstance(shard, Experience)
              else shard.chunk(micro))
    if ds_default:
        for index, piece in enumerate(pieces):
            engine.set_gradient_accumulation_boundary(index == len(pieces) - 1)
            engine.backward(loss_fn(piece)[0])
    else:
        accumulate_gradients(engine, pieces, loss_fn)
    grads = full_grads(worker.role_engine.module)
    discard_gradients(engine)
    return grads


def stage_gradient_job(model_dir: str, value_dir: str, out_dir: str, sft_exp: Experience, sft_uneven: Experience,
                       pairs: PreferenceBatch, micros: list) -> dict:
    """Full gradients of the SFT and reward-model engines (built by the stage workers) for each micro-batch
    size, an uneven sharding (SFT, 7 rows), and DeepSpeed's default semantics (negative controls)."""
    world = dist.dp_size()
    cfg = load_config("sft_tiny", [f"actor.model_path={model_dir}", f"actor.num_ranks={world}", "actor.micro_batch_size=2",
                                   "trainer.sft.batch_size=8", f"reward.model_path={value_dir}", f"reward.num_ranks={world}",
                                   "reward.micro_batch_size=2", "trainer.rm.steps=1", "trainer.rm.batch_size=8",
                                   f"trainer.output_dir={out_dir}"])
    device = dist.get_device()
    sft, rm = SftWorker(cfg), RmWorker(cfg)
    sft.init_model(10)
    rm.init_model(10)
    sft_fn = lambda micro: sft_loss(sft.engine, micro, device=device)            # noqa: E731
    rm_fn = lambda micro: reward_model_loss(rm.engine, micro, device=device)     # noqa: E731
    out = {}
    for micro in micros:
        out[("sft", micro)] = _grads(sft, sft_fn, sft_exp, micro)
        out[("rm", micro)] = _grads(rm, rm_fn, pairs, micro)
    out[("sft_uneven", 2)] = _grads(sft, sft_fn, sft_uneven, 2, even=False)
    out[("sft_ds_default", 2)] = _grads(sft, sft_fn, sft_exp, 2, ds_default=True)
    out[("rm_ds_default", 2)] = _grads(rm, rm_fn, pairs, 2, ds_default=True)
    return out if dist.dp_rank() == 0 else {}
