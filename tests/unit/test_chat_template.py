"""The real-model path on CPU: the byte-level BPE preset with a chat template and no pad token, prompts
encoded through the template (``data.apply_chat_template``), the start-up refusal of a tokenizer without
one, and held-out scoring of worked solutions with ``final_number``."""
import re

import pytest
import torch
from transformers import AutoTokenizer

from rlhf_ds.config import load_config
from rlhf_ds.trainer import scoring
from rlhf_ds.data.preferences import PreferenceRecord, build_preference_batch
from rlhf_ds.data.prompts import PromptRecord, encode_prompts
from rlhf_ds.rewards import runner_from_config
from rlhf_ds.data.tasks import generate_split
from rlhf_ds.data.word_problems import WORD_PROBLEMS
from rlhf_ds.models.tiny import BPE_SPECIAL_TOKENS, IM_END, IM_START, build_tokenizer, get_preset, resolve_model_path
from rlhf_ds.models.tokenizer import check_chat_template, load_tokenizer
from rlhf_ds.models.value_model import ValueModel
from rlhf_ds.rollout.base import RolloutSample
from rlhf_ds.trainer.sft_stage import encode_examples

RECIPE = "grpo_tiny_gsm8k"
CHATML_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(LM dir, value-model dir) of tiny:qwen2-bpe, built into a cache of this module's own."""
    cache = tmp_path_factory.mktemp("cache")
    return resolve_model_path("tiny:qwen2-bpe", cache), resolve_model_path("tiny:qwen2-bpe-value", cache)


@pytest.fixture(scope="module")
def tok(model_dirs):
    """The tokenizer as a run loads it (pad falls back to eos)."""
    return load_tokenizer(model_dirs[0])


def _records(n=12):
    return generate_split("word_problems", "eval", n, seed=5)


# --- the tokenizer -----------------------------------------------------------------------------------

def test_bpe_tokenizer_round_trips_every_kind_of_word_problem_text():
    tok = build_tokenizer(get_preset("qwen2-bpe"))
    assert 380 <= len(tok) <= 520
    assert [tok.convert_ids_to_tokens(len(tok) - 3 + i) for i in range(3)] == list(BPE_SPECIAL_TOKENS)
    assert (tok.bos_token, tok.pad_token, tok.unk_token, tok.eos_token) == (None, None, None, IM_END)
    records = [WORD_PROBLEMS.record(i) for i in range(0, WORD_PROBLEMS.size, 997)] + _records()
    for text in [t for r in records for t in (r.prompt, r.answer)] + ["Zoë: 1,234.5 × 7 ≠ ?\n"]:
        ids = tok(text)["input_ids"]
        assert not set(ids) & set(tok.all_special_ids)   # no bos, nothing added
        assert tok.decode(ids) == text
    # digits are single tokens (Qwen2's split), words of the corpus are one token each
    assert tok.tokenize("Tom has 12 apples") == ["Tom", "Ġhas", "Ġ", "1", "2", "Ġapples"]


def test_two_builds_give_the_same_tokenizer(model_dirs):
    first, second = build_tokenizer(get_preset("qwen2-bpe")), build_tokenizer(get_preset("qwen2-bpe"))
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    saved = AutoTokenizer.from_pretrained(model_dirs[0])
    assert saved.get_vocab() == first.get_vocab()


def test_saved_tokenizer_keeps_its_chat_template_and_has_no_pad_token(model_dirs, tok):
    for path in model_dirs:
        loaded = AutoTokenizer.from_pretrained(path)
        assert loaded.chat_template and loaded.pad_token is None and loaded.bos_token is None
        assert loaded.eos_token == IM_END
        text = loaded.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                          tokenize=False)
        assert text == CHATML_PROMPT.format("Hi")
        without = loaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        assert without == "<|im_start|>user\nHi<|im_end|>\n"
    # a run pads with eos; padding is masked out, so responses padded with "eos" still end where they ended
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert ValueModel.from_pretrained(model_dirs[1]).config.vocab_size == len(tok)


# --- encoding prompts ----------------------------------------------------------------------------------

def test_encode_prompts_with_and_without_the_chat_template(tok):
    records = _records(4)
    plain = encode_prompts(tok, records, 64)
    chat = encode_prompts(tok, records, 64, chat_template=True)
    start, end, newline = tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END), tok("\n")["input_ids"]
    for record, plain_ids, chat_ids in zip(records, plain, chat, strict=True):
        assert plain_ids == tok(record.prompt)["input_ids"]
        assert chat_ids == ([start] + tok("user")["input_ids"] + newline + plain_ids + [end] + newline
                            + [start] + tok("assistant")["input_ids"] + newline)
        assert tok.decode(chat_ids) == CHATML_PROMPT.format(record.prompt)
    longest = max(len(ids) for ids in chat)
    with pytest.raises(ValueError, match="raise rollout.max_prompt_len"):
        encode_prompts(tok, records, longest - 1, chat_template=True)


def test_sft_examples_and_preference_pairs_use_the_template_and_end_on_eos(tok):
    records = _records(3)
    prompts, completions = encode_examples(tok, records, chat_template=True)
    assert prompts == encode_prompts(tok, records, 64, chat_template=True)
    for record, completion in zip(records, completions, strict=True):
        assert completion[-1] == tok.eos_token_id and tok.eos_token_id not in completion[:-1]
        assert tok.decode(completion) == record.answer + IM_END
    assert encode_examples(tok, records)[0] == encode_prompts(tok, records, 64)   # off: plain prompts
    pairs = [PreferenceRecord(r.prompt, r.answer, r.answer + "1") for r in records]
    batch = build_preference_batch(tok, pairs, 64, chat_template=True)
    first = batch.chosen.prompt_ids[0][batch.chosen.prompt_mask[0].bool()].tolist()
    assert first == prompts[0]


# --- the start-up refusal ------------------------------------------------------------------------------

def test_a_tokenizer_without_a_template_is_refused_naming_the_key_the_path_and_the_fix(tok):
    char = load_tokenizer("tiny:llama-micro")
    check_chat_template(char, False, "actor")   # not asked for: fine
    check_chat_template(tok, True, "actor")     # has one: fine
    with pytest.raises(ValueError) as err:
        check_chat_template(char, True, "reward")
    message = str(err.value)
    for part in ("data.apply_chat_template=true", resolve_model_path("tiny:llama-micro"),
                 "set data.apply_chat_template=false", "reward.tokenizer_path"):
        assert part in message, part


def _refuses_before_any_engine(start, cfg, monkeypatch, tmp_path):
    from rlhf_ds.trainer import rm_stage, run, sft_stage

    monkeypatch.setattr(run, "build_roles", lambda *a, **k: pytest.fail("an engine was built"))
    for stage in (sft_stage, rm_stage):
        monkeypatch.setattr(stage, "build_stage_roles", lambda *a, **k: pytest.fail("an engine was built"))
    with pytest.raises(ValueError, match=r"data.apply_chat_template=true, but the tokenizer .*has no chat template"):
        start(cfg)
    assert not (tmp_path / "out").exists()


def test_every_start_up_refuses_the_template_request_before_any_engine(tmp_path, monkeypatch):
    from rlhf_ds.trainer.rm_stage import run_rm_stage
    from rlhf_ds.trainer.run import build_trainer
    from rlhf_ds.trainer.sft_stage import run_sft_stage

    common = ["data.apply_chat_template=true", f"trainer.output_dir={tmp_path / 'out'}"]
    rl = load_config(RECIPE, common + ["actor.model_path=tiny:llama-micro"])
    _refuses_before_any_engine(lambda cfg: build_trainer(cfg, show_progress=False), rl, monkeypatch, tmp_path)
    _refuses_before_any_engine(lambda cfg: run_sft_stage(cfg, log=lambda *_: None), rl, monkeypatch, tmp_path)
    rm = load_config("rm_tiny", common + ["reward.model_path=tiny:llama-micro-value"])
    _refuses_before_any_engine(lambda cfg: run_rm_stage(cfg, log=lambda *_: None), rm, monkeypatch, tmp_path)


# --- scoring worked solutions ----------------------------------------------------------------------------

def _scripted(tok, records, prompts, response_text):
    """A generate function that answers prompt i with ``response_text(record i)`` (eos included when the
    text asks for it), checking that it was sent the templated prompts."""
    def generate(request, n, sampling, seed):
        assert request == prompts and n == 1 and sampling.temperature == 0
        samples = []
        for i, record in enumerate(records):
            text, ends = response_text(record)
            ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if ends else [])
            samples.append(RolloutSample(prompt_index=i, response=ids, logprobs=[0.0] * len(ids)))
        return samples
    return generate


def _wrong(answer: str) -> str:
    number = answer.rsplit("#### ", 1)[1]
    return re.sub(rf"{number}$", str(int(number) + 1), answer)


def test_scripted_worked_solutions_score_by_final_number_on_evaluation(tok):
    cfg = load_config(RECIPE)
    records = generate_split("word_problems", "eval", 16, seed=cfg.data.task_seed)
    prompts = encode_prompts(tok, records, cfg.rollout.max_prompt_len, chat_template=True)
    cases = {"correct": lambda r: (r.answer, True), "wrong": lambda r: (_wrong(r.answer), True),
             "cut_off": lambda r: (r.answer, False)}
    expected = {"correct": (1.0, 1.0), "wrong": (0.0, 1.0), "cut_off": (0.0, 0.0)}
    runner = runner_from_config(cfg.reward)
    try:
        for name, response_text in cases.items():
            metrics = scoring.evaluate(_scripted(tok, records, prompts, response_text), tok, records, prompts,
                                       0.0, cfg.rollout.max_response_len, tok.pad_token_id, cfg.rollout.max_prompt_len,
                                       stop_ids=(tok.eos_token_id,), runner=runner,
                                       correct_score=cfg.reward.correct_score)
            assert (metrics["eval/accuracy"], metrics["eval/finished"]) == expected[name], name
    finally:
        runner.close()


def test_decoded_responses_are_the_solution_text_whatever_their_padding(tok):
    """Responses of different lengths are right-padded with the pad id, which is eos: decoding reads the
    mask, so the text is the solution (spaces, '####') and 'finished' is whether the response had eos."""
    from rlhf_ds.rollout.base import build_experience

    records = _records(4)
    prompts = encode_prompts(tok, records, 64, chat_template=True)
    samples = [RolloutSample(i, tok(r.answer)["input_ids"] + ([tok.eos_token_id] if i % 2 == 0 else []), [])
               for i, r in enumerate(records)]
    exp = build_experience(prompts, samples, tok.pad_token_id, 64, 32)
    assert bool((exp.response_ids == tok.eos_token_id).logical_and(exp.response_mask == 0).any())   # pad == eos
    texts, finished = scoring.decode(tok, exp, (tok.eos_token_id,))
    assert texts == [r.answer for r in records] and finished == [True, False, True, False]
    assert torch.equal(exp.response_mask.sum(1), torch.tensor([len(s.response) for s in samples]))


def test_the_recipe_describes_what_it_promises_and_fits_every_problem(tok):
    cfg = load_config(RECIPE)
    assert (cfg.actor.model_path, cfg.data.train_path, cfg.data.apply_chat_template) == (
        "tiny:qwen2-bpe", "synthetic:word_problems", True)
    assert list(cfg.reward.functions) == ["final_number"] and not cfg.needs_reference
    # the longest texts: every (template, person, item) at its largest operands (the most digits)
    longest = [PromptRecord(*WORD_PROBLEMS.texts(t, person, item, template.operands(template.num_operands - 1)))
               for t, template in enumerate(WORD_PROBLEMS.templates)
               for person in range(len(WORD_PROBLEMS.people)) for item in range(len(WORD_PROBLEMS.items))]
    encode_prompts(tok, longest, cfg.rollout.max_prompt_len, chat_template=True)   # raises when one is too long
    _, completions = encode_examples(tok, longest, chat_template=True)
    assert max(map(len, completions)) <= cfg.rollout.max_response_len   # the solution and its eos
