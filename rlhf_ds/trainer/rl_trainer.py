"""The RL loop (GRPO, PPO and the other estimators) as a short sequence of named, timed stages.

    prompts -> rollout -> rewards -> old / reference log-probs, values -> advantages
            -> for each epoch and mini-batch: token weights on the whole mini-batch, train actor
               (and critic) -> weight sync -> metrics -> log, evaluate, save

The driver owns the batch; role groups (``cluster.group.Group``) do the model work, whichever launcher
placed them. Each mini-batch gets its per-token loss weights once (``algo.token_weights``), shared by
actor and critic. Metrics returned by ``train_minibatch`` are already combined over the role's
data-parallel ranks by kind, so every rank returns the same dict and rank 0's is taken; mini-batches are
then averaged (``reduce_metrics_across_minibatches``).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch

from rlhf_ds.algo import (
    compute_advantages,
    kl_penalty,
    make_kl_controller,
    reduce_metrics_across_minibatches,
    token_weights,
)
from rlhf_ds.batch import Experience, padded_fraction
from rlhf_ds.config import Config
from rlhf_ds.data.prompts import PromptLoader, PromptRecord, encode_prompts
from rlhf_ds.models.tokenizer import model_stop_token_ids
from rlhf_ds.rollout.base import SamplingParams, build_experience, generate, generate_async
from rlhf_ds.trainer import checkpoint, scoring
from rlhf_ds.trainer.colocation import MemoryHandoff
from rlhf_ds.trainer.logging import RunLogger

# Rollout seeds: a fixed function of (seed, step), so a resumed run draws what the uninterrupted one did.
_STEP_SEED_STRIDE = 100_003


class StageTimer:
    """``with timer("rollout"): ...`` records ``timing/rollout_s``; ``timing/step_s`` is the total."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{k}_s": v for k, v in self.seconds.items()}
        out["timing/step_s"] = time.perf_counter() - self.start
        return out


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return ((x * mask).sum() / mask.sum().clamp(min=1)).item()


def logprob_gap(exp: Experience) -> dict[str, float]:
    """How far the engine's sampling log-probs are from the actor's recomputed ones, on the same weights
    (kernels, precision, batch shapes): |old - rollout| over response tokens; what ``algo.tis`` corrects."""
    gap = (exp.require("old_logprobs") - exp.require("rollout_logprobs")).abs() * exp.response_mask
    return {"rollout/logprob_diff_mean": _masked_mean(gap, exp.response_mask),
            "rollout/logprob_diff_max": gap.max().item() if gap.numel() else 0.0}


class RLTrainer:
    def __init__(self, cfg: Config, roles: Any, tokenizer: Any, train_records: list[PromptRecord],
                 eval_records: list[PromptRecord], reward_runner: Optional[Any] = None,
                 show_progress: bool = True):
        self.cfg, self.roles, self.tokenizer = cfg, roles, tokenizer
        self.stop_ids = model_stop_token_ids(cfg.actor.model_path, tokenizer)   # what a finished response ends on
        self.loader = PromptLoader(train_records, cfg.data.prompts_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.eval_records = eval_records
        self.eval_prompts = encode_prompts(tokenizer, eval_records, cfg.rollout.max_prompt_len,
                                           chat_template=cfg.data.apply_chat_template)
        encode_prompts(tokenizer, train_records, cfg.rollout.max_prompt_len,
                       chat_template=cfg.data.apply_chat_template)  # too long: fail now
        # rule rewards are computed once, by the main process, and shared: under the deepspeed launcher
        # every rank must train on the same rewards, even when a reward function times out on one rank
        self.reward_runner = None if reward_runner is None else (
            lambda *args: roles.from_main(lambda: reward_runner(*args)))
        algo = cfg.algo
        self.kl = make_kl_controller(algo.kl_coef, adaptive=algo.adaptive_kl, target=algo.kl_target,
                                     horizon=algo.kl_horizon)
        self.step = 0
        self.show_progress = show_progress
        self.sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                                       cfg.rollout.max_response_len, cfg.rollout.ignore_eos)
        # set by the caller (SIGTERM / SIGINT handlers): stop at the next safe point, with a checkpoint
        self.stop_requested: Callable[[], bool] = lambda: False
        self.synced_step = 0              # the step whose weights the engines serve
        self.memory = MemoryHandoff(cfg, roles)   # colocated sleep mode: who holds the GPU when
        self._ahead: Optional[Callable] = None   # asynchronous generation: the next step's batch, started
        self._loader_state_before_ahead: dict = {}

    @property
    def is_main(self) -> bool:
        """Under the deepspeed launcher every rank runs this loop; one process writes logs and files."""
        return self.roles.is_main

    # ---------------------------------------------------------------- the loop
    def fit(self) -> dict:
        cfg = self.cfg.trainer
        resumed = self.resume() if cfg.resume else None
        if resumed is None and self.is_main:
            retired = checkpoint.retire_checkpoints(cfg.output_dir, keep=cfg.keep_checkpoints)
            if retired:
                print(f"a fresh run: moved the earlier run's checkpoints to {retired}")
        if resumed is None and self.memory.engines_start_asleep:
            self.sync_weights()   # the engines hold no weights yet (a resumed run synced its restored ones)
        logger = RunLogger(cfg.output_dir, cfg.max_steps, self.step, self.cfg.summary_interval,
                           self.show_progress, main=self.is_main, config=self.cfg)
        if self.step == 0:   # the "before" point of the held-out curve (a resumed run already has it)
            logger.log(self.step, self.evaluate())
        stopped = None
        while self.step < cfg.max_steps:
            self.step += 1
            metrics = self.train_step(self.step)
            if self._due(cfg.eval_interval, self.step):
                metrics.update(self.evaluate())
            logger.log(self.step, metrics)
            saved = self._due(cfg.save_interval, self.step)
            if saved:
                self.save()
            # a safe point: every controller agrees, so SPMD ranks stop at the same step
            if self.roles.any_process(self.stop_requested()):
                if not saved:
                    self.save()
                stopped = self.step
                break
        return logger.finish({"resumed_from": resumed, "stopped_at_step": stopped})

    def _due(self, interval: int, step: int) -> bool:
        return step == self.cfg.trainer.max_steps or (interval > 0 and step % interval == 0)

    def train_step(self, step: int) -> dict[str, float]:
        timer = StageTimer()
        with timer("rollout"):   # asynchronous generation: only the wait for the batch made during the last step
            exp, records = self.rollout_batch(step)
            memory = self.memory.after_rollout()
        with timer("rewards"):
            exp, metrics = self.rewards(exp, records)
        with timer("logprobs"):
            exp = self.forward_passes(exp)
        if exp.old_logprobs is not None:
            metrics.update(logprob_gap(exp))
        with timer("advantages"):
            exp, adv_metrics = self.advantages(exp)
        with timer("train"):
            self.memory.before_train()
            train_metrics = self.update(exp)
        kl = adv_metrics.get("actor/kl")
        if kl is not None and math.isfinite(kl):   # the coefficient this step used, then the next one
            self.kl.update(kl, len(exp))
        elif kl is not None:   # a non-finite KL never reaches the controller: it keeps its coefficient
            adv_metrics["actor/kl_nonfinite"] = 1.0
        if not self.cfg.rollout.async_generation:   # (asynchronous: at the next batch, or before evaluating)
            with timer("sync"):
                memory.update(self.memory.before_sync())
                self.sync_weights()
        metrics.update(adv_metrics, **train_metrics, **memory, **timer.metrics())
        if "actor/rollout_gap_sum" in metrics:   # measured by the training forward (on-policy update)
            gap_sum, gap_tokens = metrics.pop("actor/rollout_gap_sum"), metrics.pop("actor/rollout_gap_tokens")
            metrics["rollout/logprob_diff_mean"] = gap_sum / max(gap_tokens, 1.0)
            metrics["rollout/logprob_diff_max"] = metrics.pop("actor/rollout_gap_max")
        metrics["perf/generated_tokens"] = exp.response_mask.sum().item()
        # padding in what the actor's forward / backward passes compute (micro-batches packed by length)
        metrics["perf/padded_fraction"] = padded_fraction(
            exp, self.cfg.actor.micro_batch_size, self.cfg.actor.num_ranks,
            by_length=self.cfg.algo.loss_reduction != "token_mean_legacy")
        metrics["data/epoch"], metrics["data/position"] = self.loader.epoch, self.loader.position
        # every real token (prompt and response) goes through forward and backward in each epoch
        metrics["perf/train_seq_tokens"] = exp.attention_mask.sum().item() * self.cfg.algo.epochs
        return metrics

    # ---------------------------------------------------------------- stages
    def rollout_batch(self, step: int) -> tuple[Experience, list[PromptRecord]]:
        """Step ``step``'s prompts and their samples.

        Synchronous: drawn and generated now, by the weights after step - 1. Asynchronous
        (``rollout.async_generation``): the batch was started during the previous step, by the weights
        after step - 2 (one step off-policy: old log-probs are recomputed, ``algo.tis`` corrects); once it
        is in, the engines get the weights after step - 1 and start on the next step's batch, which they
        generate while this one trains."""
        if not self.cfg.rollout.async_generation:
            return self._start_rollout(step)()
        ahead = self._ahead or self._start_rollout(step)
        exp, records = ahead()
        self._ahead = None
        self.sync_weights_if_behind(step - 1)   # the actor has trained step - 1 steps
        if step < self.cfg.trainer.max_steps:
            self._loader_state_before_ahead = self.loader.state_dict()
            self._ahead = self._start_rollout(step + 1)
        return exp, records

    def finish_ahead(self) -> None:
        """Asynchronous generation: wait until the batch generated ahead is in (it stays queued for its
        step), so that nothing runs on the engines any more; a no-op otherwise."""
        if self._ahead is not None:
            batch = self._ahead()
            self._ahead = lambda: batch

    def _start_rollout(self, step: int) -> Callable[[], tuple[Experience, list[PromptRecord]]]:
        """Draw step ``step``'s prompts and start generating; the returned call waits for the batch."""
        records = self.loader.next_batch()
        prompts = encode_prompts(self.tokenizer, records, self.cfg.rollout.max_prompt_len,
                                 chat_template=self.cfg.data.apply_chat_template)
        wait = generate_async(self.roles.rollout, prompts, self.cfg.rollout.n, self.sampling,
                              self.cfg.seed * _STEP_SEED_STRIDE + step)

        def done() -> tuple[Experience, list[PromptRecord]]:
            exp = build_experience(prompts, wait(), self.tokenizer.pad_token_id, self.cfg.rollout.max_prompt_len,
                                   self.cfg.rollout.max_response_len)
            return exp, records

        return done

    def rewards(self, exp: Experience, records: list[PromptRecord]) -> tuple[Experience, dict[str, float]]:
        texts, finished = scoring.decode(self.tokenizer, exp, self.stop_ids)
        pending = (self.roles.reward.dispatch_async("compute_scores", exp) if self.roles.reward is not None
                   else None)
        # float64: reward statistics must not round large or close rewards together (1e8 + 1 == 1e8 in fp32)
        total = torch.zeros(len(exp), dtype=torch.float64)
        metrics: dict[str, float] = {}
        rule_scores = None
        if self.reward_runner is not None:
            rule_scores, metrics = scoring.score_rules(self.reward_runner, records, exp, texts, finished)
            total = total + rule_scores
        if pending is not None:
            reward = self.cfg.reward
            model_scores, model_metrics = scoring.clean_model_scores(pending.get().double(),
                                                                     reward.nonfinite_model_score, reward.failure_value)
            metrics.update(model_metrics)
            metrics["reward/model_mean"] = model_scores.mean().item()
            total = total + reward.model_weight * model_scores
        metrics.update(scoring.response_metrics(exp, finished, total, rule_scores))
        return exp.replace(rewards=total), metrics

    def forward_passes(self, exp: Experience) -> Experience:
        """Old log-probs (actor), reference log-probs and values, the three roles working concurrently.
        An on-policy update (``Config.on_policy_update``) takes its old log-probs from the training
        forward instead: no separate actor pass."""
        roles = self.roles
        old = None if self.cfg.on_policy_update else roles.actor.dispatch_async("compute_logprobs", exp)
        ref = roles.reference.dispatch_async("compute_logprobs", exp) if roles.reference is not None else None
        values = roles.critic.dispatch_async("compute_values", exp) if roles.critic is not None else None
        return exp.replace(old_logprobs=old.get() if old else None, ref_logprobs=ref.get() if ref else None,
                           values=values.get() if values else None)

    def advantages(self, exp: Experience) -> tuple[Experience, dict[str, float]]:
        algo, metrics = self.cfg.algo, {}
        kl = None
        if exp.ref_logprobs is not None:
            kl = kl_penalty(exp.require("old_logprobs"), exp.ref_logprobs, algo.kl_estimator)
            metrics["actor/kl"] = _masked_mean(kl, exp.response_mask)
            metrics["actor/kl_coef"] = self.kl.value
        in_reward = algo.kl_placement == "reward"
        out = compute_advantages(algo.advantage_estimator, exp.require("rewards"), exp.response_mask, exp.group_ids,
                                 values=exp.values, kl=kl if in_reward else None,
                                 kl_coef=self.kl.value if in_reward else 0.0, gamma=algo.gamma, lam=algo.lam,
                                 whiten=algo.whiten_advantages)
        metrics["advantages/mean"] = _masked_mean(out.advantages, exp.response_mask)
        metrics["advantages/abs_mean"] = _masked_mean(out.advantages.abs(), exp.response_mask)
        metrics["reward/nonfinite"] = float(out.num_nonfinite)
        # the losses run in the actor's float32; the statistics above were float64
        returns = out.returns.float() if out.returns is not None else None
        return exp.replace(advantages=out.advantages.float(), returns=returns), metrics

    def with_token_weights(self, minibatch: Experience) -> Experience:
        """The mini-batch with its per-token loss weights (``algo.loss_reduction``), computed once on the
        whole mini-batch before it is sharded; actor and critic train on the same weights."""
        algo = self.cfg.algo
        weights = token_weights(minibatch.response_mask, algo.loss_reduction, group_ids=minibatch.group_ids,
                                micro_batch_size=self.cfg.actor.micro_batch_size,
                                loss_norm_len=self.cfg.loss_norm_len)
        return minibatch.replace(token_weights=weights)

    def update(self, exp: Experience) -> dict[str, float]:
        """Every epoch, every mini-batch: one optimizer step of the actor (and of the critic)."""
        roles, per_minibatch = self.roles, []
        for _ in range(self.cfg.algo.epochs):
            for minibatch in exp.chunk(self.cfg.algo.mini_batch_size):
                minibatch = self.with_token_weights(minibatch)
                actor = roles.actor.dispatch_async("train_minibatch", minibatch, self.kl.value, concat=False)
                critic = (roles.critic.dispatch_async("train_minibatch", minibatch, concat=False)
                          if roles.critic is not None else None)
                metrics = {f"actor/{k}": v for k, v in actor.get()[0].items()}
                if critic is not None:
                    metrics.update({f"critic/{k}": v for k, v in critic.get()[0].items()})
                per_minibatch.append(metrics)
        return reduce_metrics_across_minibatches(per_minibatch)

    def sync_weights(self, trained_steps: Optional[int] = None) -> None:
        """The engines serve the actor's weights after ``trained_steps`` optimizer steps (default
        ``self.step``), as weight version ``step-N``."""
        trained = self.step if trained_steps is None else trained_steps
        self.roles.actor.sync_weights(self.roles.rollout, self.cfg.rollout.weight_sync_bucket_mb, f"step-{trained}")
        self.synced_step = trained

    def sync_weights_if_behind(self, trained_steps: Optional[int] = None) -> None:
        if self.synced_step != (self.step if trained_steps is None else trained_steps):
            self.sync_weights(trained_steps)

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.sync_weights_if_behind()   # asynchronous runs sync lazily; evaluation sees this step's weights
        rollout = self.cfg.rollout
        out = scoring.evaluate(lambda *request: generate(self.roles.rollout, *request), self.tokenizer,
                               self.eval_records, self.eval_prompts, rollout.eval_temperature,
                               rollout.max_response_len, self.tokenizer.pad_token_id, rollout.max_prompt_len,
                               stop_ids=self.stop_ids, runner=self.reward_runner,
                               correct_score=self.cfg.reward.correct_score,
                               pass_k=self.cfg.trainer.eval_pass_k, pass_k_temperature=rollout.temperature)
        out["timing/eval_s"] = time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        # a batch generated ahead is not trained yet: a resumed run draws its prompts again
        loader = self._loader_state_before_ahead if self._ahead is not None else self.loader.state_dict()
        return {"step": self.step, "loader": loader, "kl": self.kl.state_dict()}

    def save(self) -> str:
        cfg = self.cfg.trainer
        return checkpoint.save_run_checkpoint(cfg.output_dir, self.step, self.roles.trainable(),
                                              self.trainer_state(), self.cfg.to_yaml(), write_files=self.is_main,
                                              keep=cfg.keep_checkpoints)

    def resume(self) -> Optional[str]:
        """Restore the latest complete checkpoint (if any) and push the restored actor to the engines.
        The caller has checked its config against this run's (``trainer.resume.check_resume``)."""
        directory = checkpoint.latest_checkpoint(self.cfg.trainer.output_dir)
        if directory is None:
            return None
        state = checkpoint.load_run_checkpoint(directory, self.roles.trainable())
        self.step = int(state["step"])
        if self.step > self.cfg.trainer.max_steps:
            raise ValueError(f"trainer.resume: the latest checkpoint {directory} is at step {self.step}, past "
                             f"trainer.max_steps={self.cfg.trainer.max_steps}; raise max_steps or choose another "
                             f"trainer.output_dir")
        self.loader.load_state_dict(state["loader"])
        self.kl.load_state_dict(state["kl"])
        self.sync_weights()
        return directory
