"""Preference pairs from a policy's own samples (`rlhf-ds pairs`), the data a reward model for that policy
needs.

A reward model trained on hand-made negatives (one digit of the answer changed) learns what separates
those, not what separates the policy's right and wrong answers; PPO then finds the answers it over-rates
(README, "Other stages"). Here the run's actor (after its cached SFT warm start) samples ``rollout.n``
responses per prompt at ``rollout.temperature`` (one HF engine in this process, on its GPU when there is
one, whatever ``rollout.backend`` says), the run's rule rewards label them (a sample is correct
when its reward reaches ``reward.correct_score``, as held-out accuracy counts it), and each prompt with a
wrong sample gives up to ``pairs_per_prompt`` pairs: chosen = one of its correct samples (the reference
answer when it has none), rejected = a distinct wrong sample that ended on eos. Train pairs come from
the train split, held-out pairs from the held-out split, written as JSONL (``prompt`` / ``chosen`` /
``rejected``) for ``rlhf-ds rm`` (``data.train_path`` / ``data.eval_path``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rlhf_ds.config import Config
from rlhf_ds.data.preferences import PreferenceRecord
from rlhf_ds.data.prompts import PromptRecord, encode_prompts, load_run_records
from rlhf_ds.models.tokenizer import check_chat_template, load_tokenizer, model_stop_token_ids
from rlhf_ds.rewards import runner_from_config
from rlhf_ds.rollout.base import SamplingParams, build_experience
from rlhf_ds.rollout.hf_engine import HFRolloutEngine
from rlhf_ds.trainer import scoring
from rlhf_ds.trainer.warm_start import with_warm_start

Log = Callable[[str], None]
# Prompts per generate call: enough rows to keep the matmuls busy, few enough to show progress.
_PROMPTS_PER_CALL = 256


def label_samples(records: Sequence[PromptRecord], texts: list[str], finished: list[bool], correct: list[bool],
                  n: int, pairs_per_prompt: int, rng: np.random.Generator) -> list[PreferenceRecord]:
    """Pairs from ``n`` labelled samples per record (prompt-major): for each record with a wrong sample,
    chosen = a correct sample (else the record's answer), rejected = a distinct wrong sample that
    finished; at most ``pairs_per_prompt`` per record."""
    pairs = []
    for i, record in enumerate(records):
        rows = range(i * n, (i + 1) * n)
        right = sorted({texts[r] for r in rows if correct[r]})
        wrong = sorted({texts[r] for r in rows if not correct[r] and finished[r] and texts[r] != record.answer})
        for rejected in rng.permutation(wrong)[:pairs_per_prompt] if wrong else []:
            chosen = right[int(rng.integers(len(right)))] if right else record.answer
            pairs.append(PreferenceRecord(record.prompt, chosen, str(rejected), {"source": "sampled", **record.meta}))
    return pairs


def sample_pairs(engine: Any, tokenizer: Any, records: Sequence[PromptRecord], cfg: Config, runner: Any, seed: int,
                 pairs_per_prompt: int, log: Log) -> tuple[list[PreferenceRecord], dict[str, float]]:
    """Pairs from ``engine``'s samples of ``records`` (see :func:`label_samples`) and what was drawn:
    ``samples``, ``correct`` (the fraction), ``pairs``."""
    rollout = cfg.rollout
    sampling = SamplingParams(rollout.temperature, rollout.top_p, rollout.top_k, rollout.max_response_len)
    rng = np.random.default_rng(seed)
    stop_ids = model_stop_token_ids(cfg.actor.model_path, tokenizer)
    pairs, num_samples, num_correct = [], 0, 0
    for start in range(0, len(records), _PROMPTS_PER_CALL):
        chunk = list(records[start:start + _PROMPTS_PER_CALL])
        prompts = encode_prompts(tokenizer, chunk, rollout.max_prompt_len, chat_template=cfg.data.apply_chat_template)
        samples = engine.generate(prompts, rollout.n, sampling, seed + start)
        exp = build_experience(prompts, samples, tokenizer.pad_token_id, rollout.max_prompt_len,
                               rollout.max_response_len)
        texts, finished = scoring.decode(tokenizer, exp, stop_ids)
        scores, _ = scoring.score_rules(runner, chunk, exp, texts, finished)
        correct = scoring.is_correct(scores, cfg.reward.correct_score).tolist()
        pairs += label_samples(chunk, texts, finished, correct, rollout.n, pairs_per_prompt, rng)
        num_samples, num_correct = num_samples + len(texts), num_correct + sum(correct)
        log(f"pairs: {start + len(chunk)}/{len(records)} prompts, {len(pairs)} pairs")
    return pairs, {"samples": num_samples, "correct": num_correct / max(num_samples, 1), "pairs": len(pairs)}


def write_pairs(pairs: Sequence[PreferenceRecord], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")


def run_pairs(cfg: Config, out_dir: str, *, pairs_per_prompt: int = 2, num_train: int = 0,
              log: Log = print) -> dict:
    """`rlhf-ds pairs`: sample the run's actor (after its warm start) on the train and held-out prompts and
    write ``OUT_DIR/train.jsonl`` and ``OUT_DIR/eval.jsonl``; returns the summary (also ``summary.json``).
    num_train: train prompts used (0 = the whole train split)."""

    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    started = time.time()
    train, held_out = load_run_records(cfg.data)
    if num_train:
        train = train[:num_train]
    cfg = with_warm_start(cfg, log)
    tokenizer = load_tokenizer(cfg.actor.model_path, cfg.actor.tokenizer_path)
    check_chat_template(tokenizer, cfg.data.apply_chat_template, "actor")
    torch.set_num_threads(os.cpu_count() or 1)   # one process does all the work
    engine = HFRolloutEngine(cfg.actor.model_path, tokenizer_path=cfg.actor.tokenizer_path,
                             decoder=cfg.rollout.hf_decoder)
    # what labels a sample: the run's rule rewards, or evaluation's stand-in when it has none
    labelled = cfg.reward.functions or cfg.reward.remote.url
    reward = cfg.reward if labelled else dataclasses.replace(cfg.reward, functions=("exact_match",),
                                                             function_weights=())
    functions = list(reward.functions) + ([reward.remote.url] if reward.remote.url else [])
    runner = runner_from_config(reward)
    if runner is None:
        raise ValueError(f"pairs: no reward function to label samples with (reward.functions={functions})")
    with runner:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary: dict = {"policy": cfg.actor.model_path, "labelled_by": functions, "n": cfg.rollout.n,
                         "temperature": cfg.rollout.temperature}
        for split, records, seed in (("train", train, cfg.seed), ("eval", held_out, cfg.seed + 1)):
            pairs, stats = sample_pairs(engine, tokenizer, records, cfg, runner, seed, pairs_per_prompt, log)
            if not pairs:
                raise ValueError(f"pairs: no {split} prompt got a wrong sample from {cfg.actor.model_path} "
                                 f"({stats['samples']} samples, {stats['correct']:.1%} correct): nothing to prefer")
            write_pairs(pairs, out / f"{split}.jsonl")
            summary[split] = {**stats, "path": str(out / f"{split}.jsonl")}
    summary["wall_time_s"] = round(time.time() - started, 1)
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
