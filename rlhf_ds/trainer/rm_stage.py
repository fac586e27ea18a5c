"""Reward-model training on ZeRO-3 engines (``rlhf-ds rm``).

    preference pairs -> for each step: a mini-batch of (prompt, chosen, rejected), pair weights
             1 / pairs on the whole mini-batch -> one optimizer step of the reward group (Bradley-Terry,
             sum-gradient step) -> every eval_interval: held-out pairwise accuracy

The trained model is exported as ``OUTPUT_DIR/reward_hf``, a scalar-head (ValueModel) directory that RL
configs take as ``reward.model_path`` with ``reward.use_model=true``.
"""
from __future__ import annotations

from typing import Any, Optional

from rlhf_ds.algo.supervised import bradley_terry_loss, pair_weights, pairwise_correct
from rlhf_ds.cluster.roles import build_stage_roles
from rlhf_ds.config import Config
from rlhf_ds.data.preferences import PreferenceBatch, PreferenceRecord, build_preference_batch, load_preference_records
from rlhf_ds.data.prompts import encode_prompts
from rlhf_ds.trainer.stage import Log, StageLoop, open_stage, run_stage
from rlhf_ds.workers.rm import RmWorker

EXPORT_NAME = "reward_hf"
EVAL_KEY = "eval/pairwise_accuracy"


def pairs_minibatch(tokenizer: Any, records: list[PreferenceRecord], max_prompt_len: int,
                    chat_template: bool = False) -> PreferenceBatch:
    """One mini-batch of pairs with its pair weights (1 / pairs), set before it is cut into rank shards."""
    batch = build_preference_batch(tokenizer, records, max_prompt_len, chat_template=chat_template)
    return batch.replace(pair_weights=pair_weights(len(batch)))


def held_out_metrics(chosen_scores, rejected_scores) -> dict[str, float]:
    """Pairwise accuracy (ties count half), mean Bradley-Terry loss and mean margin of scored pairs."""
    return {EVAL_KEY: pairwise_correct(chosen_scores, rejected_scores).mean().item(),
            "eval/pairwise_loss": bradley_terry_loss(chosen_scores.double(), rejected_scores.double()).mean().item(),
            "eval/margin": (chosen_scores.double() - rejected_scores.double()).mean().item()}


class RewardModelStage(StageLoop):
    name = "rm"
    eval_key = EVAL_KEY

    def __init__(self, cfg: Config, roles: Any, tokenizer: Any, train: list[PreferenceRecord],
                 held_out: list[PreferenceRecord], **loop_args):
        rm = cfg.trainer.rm
        super().__init__(cfg, roles, "reward", train, steps=rm.steps, batch_size=rm.batch_size,
                         eval_interval=rm.eval_interval, save_interval=rm.save_interval, **loop_args)
        self.tokenizer = tokenizer
        # ZeRO-3 gathers parameters collectively: every rank scores the same number of pairs
        usable = len(held_out) - len(held_out) % self.group.num_ranks
        if usable == 0:
            raise ValueError(f"rm: {len(held_out)} held-out pairs cannot be split over {self.group.num_ranks} ranks")
        self.eval_batch = build_preference_batch(tokenizer, held_out[:usable], cfg.rollout.max_prompt_len,
                                                 chat_template=cfg.data.apply_chat_template)

    def train_step(self) -> dict[str, float]:
        batch = pairs_minibatch(self.tokenizer, self.loader.next_batch(), self.cfg.rollout.max_prompt_len,
                                self.cfg.data.apply_chat_template)
        # shards may differ by a pair: the weights are the whole mini-batch's (see SftStage.train_step)
        metrics = self.group.dispatch("train_pairs", batch, even=False, concat=False)[0]
        return {f"rm/{name}": m.value for name, m in metrics.items()}

    def evaluate(self) -> dict[str, float]:
        chosen, rejected = self.group.dispatch("score_pairs", self.eval_batch)
        return held_out_metrics(chosen, rejected)


def run_rm_stage(cfg: Config, *, output_dir: Optional[str] = None, resume: Optional[bool] = None,
                 log: Log = print, show_progress: bool = True) -> dict:
    """Train the reward model of ``cfg`` (``reward.*`` model, ``trainer.rm`` optimisation, preference data
    from ``data.*``) into ``output_dir`` (default ``trainer.output_dir``): metrics, checkpoints, and the
    model as an HF directory ``OUTPUT_DIR/reward_hf``. resume: default ``trainer.resume``."""
    def check_data(tokenizer: Any) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
        train, held_out = load_preference_records(cfg.data)
        encode_prompts(tokenizer, train + held_out, cfg.rollout.max_prompt_len,
                       chat_template=cfg.data.apply_chat_template)
        return train, held_out

    cfg, resume, tokenizer, (train, held_out) = open_stage(cfg, output_dir, resume, stage="rm", role="reward",
                                                           check_data=check_data, log=log)
    return run_stage(cfg, lambda: build_stage_roles(cfg, "reward", RmWorker, cfg.trainer.rm.steps,
                                                    with_rollout=False),
                     lambda roles: RewardModelStage(cfg, roles, tokenizer, train, held_out, show_progress=show_progress,
                                                    log=log),
                     EXPORT_NAME, resume=resume)
