"""Supervised warm start of the actor on the task's reference answers (cached).

RL with a bare 0/1 reward only moves a model that already succeeds sometimes, so the default run first
fine-tunes the tiny model on ``prompt -> answer<eos>`` until held-out greedy accuracy (scored by the
run's rule rewards, as RL evaluation scores it) reaches ``trainer.sft.target_eval_accuracy`` (DESIGN.md:
stop on validation accuracy, not on time — the data order moves the jump by ~20 s). A small single-process PyTorch loop: the warm start of a ~100 K-parameter model
needs no ZeRO sharding.

The result is an HF directory in the cache keyed by everything that determines it; a finished directory
(marker written last) is reused at once, so `make train-grpo` pays for SFT only the first time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from rlhf_ds.batch import Experience, pad_prompts, pad_responses
from rlhf_ds.config import Config
from rlhf_ds.data import scoring
from rlhf_ds.data.prompts import PromptRecord, encode_prompts, load_run_records
from rlhf_ds.data.rewards import runner_from_config
from rlhf_ds.fs import publish_directory
from rlhf_ds.models.tiny import default_cache_dir, resolve_model_path
from rlhf_ds.models.tokenizer import load_tokenizer
from rlhf_ds.rollout.hf_engine import HFRolloutEngine

MARKER = ".sft_complete"


def sft_dir(cfg: Config) -> Path:
    """Cache directory of the warm start this config asks for."""
    key = {"model": cfg.actor.model_path, "sft": dataclasses.asdict(cfg.trainer.sft), "seed": cfg.seed,
           "data": [cfg.data.train_path, cfg.data.eval_path, cfg.data.num_train, cfg.data.num_eval,
                    cfg.data.task_seed, cfg.data.prompt_key, cfg.data.answer_key],
           "max_response_len": cfg.rollout.max_response_len, "version": 1}
    # The tokenizer and the rewards that score the stop, keyed only when they differ from what every
    # warm start used before they were keys (the model's tokenizer, exact_match), so those stay valid.
    if cfg.actor.tokenizer_path:
        key["tokenizer"] = cfg.actor.tokenizer_path
    scored_by = [list(cfg.reward.functions) or ["exact_match"], list(cfg.reward.function_weights),
                 cfg.reward.correct_score]   # no functions: exact_match scores evaluation
    if scored_by != [["exact_match"], [], 1.0]:
        key["eval"] = scored_by
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = cfg.actor.model_path.replace("tiny:", "").replace("/", "_").strip("_")[-40:]
    return default_cache_dir() / "sft" / f"{name}-{digest}"


def encode_examples(tokenizer, records: list[PromptRecord]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (bos + prompt) and completion ids (answer + eos) of each record."""
    prompts = [tokenizer(r.prompt)["input_ids"] for r in records]
    completions = [tokenizer(r.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                   for r in records]
    return prompts, completions


def sft_loss(model: torch.nn.Module, exp: Experience) -> torch.Tensor:
    """Token-mean cross-entropy of the completion tokens (logits of token t at position P + t - 1)."""
    out = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids)
    logits = out.logits[:, exp.prompt_len - 1: exp.prompt_len + exp.response_len - 1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), exp.response_ids, reduction="none")
    return (nll * exp.response_mask).sum() / exp.response_mask.sum()


def _batch(prompts, completions, rows: np.ndarray, pad_id: int) -> Experience:
    prompt_ids, prompt_mask = pad_prompts([prompts[i] for i in rows], pad_id)
    response_ids, response_mask = pad_responses([completions[i] for i in rows], pad_id)
    return Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, group_ids=torch.as_tensor(rows))


def run_sft(cfg: Config, log=print) -> str:
    """Warm-start the actor (or reuse the cached result); returns the HF directory."""
    out = sft_dir(cfg)
    if (out / MARKER).exists():
        log(f"sft: reusing {out} ({(out / MARKER).read_text().strip()})")
        return str(out)
    tokenizer = load_tokenizer(cfg.actor.model_path, cfg.actor.tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.actor.model_path), dtype=torch.float32)
    runner = runner_from_config(cfg.reward)
    try:
        note = _train(cfg, model, tokenizer, runner, log)
    finally:
        if runner is not None:
            runner.close()
    # SFT runs once per cache key: an unfinished directory left by a killed run is replaced
    publish_directory(out, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), MARKER,
                      note + "\n")
    log(f"sft: saved {out} ({note})")
    return str(out)


def _train(cfg: Config, model: torch.nn.Module, tokenizer, runner, log) -> str:
    """The SFT loop, stopped at the target held-out accuracy (scored by ``runner``, the run's rule
    rewards; None = exact_match); returns a one-line note of what it did."""
    sft = cfg.trainer.sft
    train, held_out = load_run_records(cfg.data)
    prompts, completions = encode_examples(tokenizer, train)
    eval_prompts = encode_prompts(tokenizer, held_out, cfg.rollout.max_prompt_len)
    evaluator = HFRolloutEngine.from_model(model, tokenizer)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr)
    started, step, accuracy = time.time(), 0, 0.0
    for step in range(1, sft.steps + 1):
        model.train()
        exp = _batch(prompts, completions, rng.choice(len(train), sft.batch_size, replace=False),
                     tokenizer.pad_token_id)
        loss = sft_loss(model, exp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % sft.eval_interval == 0 or step == sft.steps:
            accuracy = scoring.evaluate(evaluator.generate, tokenizer, held_out, eval_prompts, 0.0,
                                        cfg.rollout.max_response_len, tokenizer.pad_token_id,
                                        cfg.rollout.max_prompt_len, runner=runner,
                                        correct_score=cfg.reward.correct_score)["eval/accuracy"]
            log(f"sft: step {step} loss {loss.item():.3f} held-out accuracy {accuracy:.3f} "
                f"({time.time() - started:.0f} s)")
            if accuracy >= sft.target_eval_accuracy:
                break
    return f"{step} steps, held-out accuracy {accuracy:.3f}, {time.time() - started:.1f} s"


def wait_for_sft(cfg: Config, timeout_s: float = 3600.0) -> str:
    """The warm start another process is producing (SPMD ranks > 0), once its marker exists."""
    out, deadline = sft_dir(cfg), time.time() + timeout_s
    while not (out / MARKER).exists():
        if time.time() > deadline:
            raise TimeoutError(f"no finished SFT warm start at {out} after {timeout_s:.0f} s")
        time.sleep(1.0)
    return str(out)
