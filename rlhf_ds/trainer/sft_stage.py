"""Supervised fine-tuning on ZeRO-3 engines (``rlhf-ds sft``, and the RL warm start).

    examples -> for each step: a mini-batch of prompt -> answer<eos> rows, token weights on the whole
             mini-batch (token_mean) -> one optimizer step of the actor group (sum-gradient step)
             -> every eval_interval: sync the weights to the rollout engines, held-out greedy accuracy
             scored by the run's rule rewards (as RL evaluation scores it); stop at the target

The actor group is the RL actor's kind of group (Ray actors or SPMD ranks) running :class:`SftWorker`;
evaluation generates with the rollout group, as RL does. Each row is one example (left-padded prompt,
right-padded answer); several examples are not packed into one row. The workers group each rank's rows
by length into micro-batches cut to their own padding (``batch.packed_micro_batches``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from rlhf_ds.algo import token_weights
from rlhf_ds.batch import Experience, pad_prompts, pad_responses
from rlhf_ds.cluster.roles import build_stage_roles
from rlhf_ds.config import Config
from rlhf_ds.data.preferences import encode_response
from rlhf_ds.data.prompts import PromptRecord, encode_prompt, encode_prompts, load_run_records
from rlhf_ds.models.tokenizer import model_stop_token_ids
from rlhf_ds.rewards import runner_from_config
from rlhf_ds.rollout.base import generate
from rlhf_ds.trainer import scoring
from rlhf_ds.trainer.stage import Log, StageLoop, open_stage, run_stage
from rlhf_ds.workers.sft import SftWorker

EXPORT_NAME = "actor_hf"


def encode_examples(tokenizer, records: list[PromptRecord], chat_template: bool = False
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and completion ids (answer + eos) of each record. The prompt is encoded as RL encodes it
    (``encode_prompt``: bos + prompt, or the chat template's user turn and generation prompt), so the
    model learns to end its answer with the eos token (``<|im_end|>`` for a ChatML tokenizer)."""
    prompts = [encode_prompt(tokenizer, r.prompt, chat_template) for r in records]
    return prompts, [encode_response(tokenizer, r.answer) for r in records]


def sft_minibatch(tokenizer, records: list[PromptRecord], chat_template: bool = False) -> Experience:
    """One SFT mini-batch with its token weights: the true token mean over the whole mini-batch
    (``token_weights(mask, "token_mean")``), set before the batch is cut into rank shards."""
    prompts, completions = encode_examples(tokenizer, records, chat_template)
    prompt_ids, prompt_mask = pad_prompts(prompts, tokenizer.pad_token_id)
    response_ids, response_mask = pad_responses(completions, tokenizer.pad_token_id)
    exp = Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                     response_mask=response_mask, group_ids=torch.arange(len(records)))
    return exp.replace(token_weights=token_weights(response_mask, "token_mean"))


class SftStage(StageLoop):
    name = "sft"
    eval_key = "eval/accuracy"

    def __init__(self, cfg: Config, roles: Any, tokenizer: Any, train: list[PromptRecord],
                 held_out: list[PromptRecord], runner: Optional[Any], **loop_args):
        sft = cfg.trainer.sft
        super().__init__(cfg, roles, "actor", train, steps=sft.steps, batch_size=sft.batch_size,
                         eval_interval=sft.eval_interval, save_interval=sft.save_interval, **loop_args)
        self.tokenizer, self.held_out, self.runner = tokenizer, held_out, runner
        self.stop_ids = model_stop_token_ids(cfg.actor.model_path, tokenizer)
        self.eval_prompts = encode_prompts(tokenizer, held_out, cfg.rollout.max_prompt_len,
                                           chat_template=cfg.data.apply_chat_template)
        self.synced_step = 0   # the step whose weights the rollout engines serve

    def train_step(self) -> dict[str, float]:
        batch = sft_minibatch(self.tokenizer, self.loader.next_batch(), self.cfg.data.apply_chat_template)
        # shards may differ by a row: the weights are the whole mini-batch's, and a rank with fewer
        # micro-batches makes up the count with zero-weight passes (engine.step)
        shards = self.group.dispatch("train_sft_minibatch", batch, even=False, concat=False)
        metrics = {name: m.value for name, m in shards[0].items()}
        tokens = metrics.pop("tokens")
        out = {f"sft/{name}": value for name, value in metrics.items() if name != "token_accuracy_sum"}
        out["sft/token_accuracy"] = metrics["token_accuracy_sum"] / max(tokens, 1.0)
        out["sft/tokens"] = tokens
        return out

    def evaluate(self) -> dict[str, float]:
        rollout = self.cfg.rollout
        if self.synced_step != self.step:
            self.group.sync_weights(self.roles.rollout, rollout.weight_sync_bucket_mb, f"sft-step-{self.step}")
            self.synced_step = self.step
        return scoring.evaluate(lambda *request: generate(self.roles.rollout, *request), self.tokenizer,
                                self.held_out, self.eval_prompts, rollout.eval_temperature,
                                rollout.max_response_len, self.tokenizer.pad_token_id, rollout.max_prompt_len,
                                stop_ids=self.stop_ids, runner=self.runner,
                                correct_score=self.cfg.reward.correct_score)

    def target_reached(self, metrics: dict[str, float]) -> bool:
        return metrics[self.eval_key] >= self.cfg.trainer.sft.target_eval_accuracy

    def resume(self) -> Optional[str]:
        directory = super().resume()
        self.synced_step = -1   # the engines serve the base model: sync before the next evaluation
        return directory


def run_sft_stage(cfg: Config, *, output_dir: Optional[str] = None, resume: Optional[bool] = None,
                  checkpoints: bool = True, log: Log = print, show_progress: bool = True) -> dict:
    """Run the SFT stage of ``cfg`` (``trainer.sft``) into ``output_dir`` (default ``trainer.output_dir``):
    metrics, checkpoints (unless ``checkpoints=False``), and the trained actor as an HF directory
    ``OUTPUT_DIR/actor_hf``. resume: default ``trainer.resume``. Returns the stage summary."""
    def check_data(tokenizer: Any) -> tuple[list[PromptRecord], list[PromptRecord]]:
        train, held_out = load_run_records(cfg.data)
        encode_prompts(tokenizer, train, cfg.rollout.max_prompt_len, chat_template=cfg.data.apply_chat_template)
        return train, held_out

    cfg, resume, tokenizer, (train, held_out) = open_stage(cfg, output_dir, resume, stage="sft", role="actor",
                                                           check_data=check_data, log=log)
    runner = runner_from_config(cfg.reward)
    try:
        return run_stage(cfg, lambda: build_stage_roles(cfg, "actor", SftWorker, cfg.trainer.sft.steps, with_rollout=True),
                         lambda roles: SftStage(cfg, roles, tokenizer, train, held_out, runner, checkpoints=checkpoints,
                                                show_progress=show_progress, log=log),
                         EXPORT_NAME, resume=resume)
    finally:
        if runner is not None:
            runner.close()
