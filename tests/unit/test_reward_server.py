"""`rlhf-ds serve-reward` as a user starts it, in a subprocess on a free loopback port: its own limits
(401 without the token, 413 over the size limit, 400 on a malformed request, the health endpoint, 500 when
the function fails), its default bind address, a rule served exactly as it scores locally, and a reward
model directory scored as a run's reward model reads it (the value head at the last real token)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from reward_server import ROOT, ServeReward, free_port

from rlhf_ds.rewards import RemoteReward
from rlhf_ds.rewards.functions import exact_match

pytestmark = pytest.mark.timeout(120)

TOKEN = "t0ken"
SAMPLE = {"prompt": "2*3=", "response": "6", "answer": "6", "finished": True}
FLAKY = '''
def fails_on_marker(prompts, responses, answers, finished):
    if "bad" in responses:
        raise ValueError("bad sample")
    return [1.0 for _ in responses]
'''


@pytest.fixture(scope="module")
def rule_server():
    server = ServeReward("exact_match", "--token", TOKEN, "--max-request-mb", "0.01")
    yield server
    server.stop()


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_health_answers_without_the_token(rule_server):
    answer = httpx.get(f"{rule_server.base}/health", timeout=5)
    assert answer.status_code == 200 and answer.json() == {"status": "ok", "version": 1}


def test_it_binds_loopback_by_default(rule_server):
    ports = [c.laddr for c in psutil.Process(rule_server.process.pid).net_connections("inet")
             if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in ports] == [("127.0.0.1", rule_server.port)]


@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}])
def test_a_request_without_the_token_is_refused(rule_server, headers):
    answer = rule_server.post({"version": 1, "samples": [SAMPLE]}, headers=headers)
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
    assert "token" in answer.json()["error"]


def test_a_request_with_the_token_is_scored(rule_server):
    answer = rule_server.post({"version": 1, "samples": [SAMPLE, {**SAMPLE, "response": "7"}]}, headers=auth())
    assert answer.status_code == 200 and answer.json() == {"version": 1, "scores": [1.0, 0.0]}
    assert rule_server.post({"version": 1, "samples": []}, headers=auth()).json() == {"version": 1, "scores": []}


def test_a_request_over_the_size_limit_is_refused_with_413(rule_server):
    big = {"version": 1, "samples": [{**SAMPLE, "response": "x" * 11_000}]}   # the limit: 0.01 MiB = 10485 bytes
    answer = rule_server.post(big, headers=auth())
    assert answer.status_code == 413 and "reward.remote.batch_size" in answer.json()["error"]

    def chunks():   # no Content-Length: the limit holds while reading
        yield b'{"version": 1, "samples": ['
        for _ in range(40):
            yield (b'{"prompt": "p", "response": "' + b"y" * 500 + b'", "answer": "a", "finished": true},')
        yield b'{"prompt": "p", "response": "r", "answer": "a", "finished": true}]}'

    answer = httpx.post(rule_server.url, content=chunks(), headers=auth(), timeout=30)
    assert answer.status_code == 413
    # just under the limit passes
    assert rule_server.post({"version": 1, "samples": [{**SAMPLE, "response": "x" * 9_000}]},
                            headers=auth()).status_code == 200


@pytest.mark.parametrize("body,why", [
    (b"not json", "Expecting value"),
    (b"\xff\xfe", "malformed request"),
    ([SAMPLE], "must be a JSON object"),
    ({"samples": [SAMPLE]}, '"version": None'),
    ({"version": 2, "samples": [SAMPLE]}, "speaks version 1"),
    ({"version": 1}, '"samples" must be a list'),
    ({"version": 1, "samples": ["text"]}, r"samples\[0\] must be an object"),
    ({"version": 1, "samples": [{**SAMPLE, "finished": "yes"}]}, r'samples\[0\]\["finished"\] must be a bool'),
    ({"version": 1, "samples": [{k: v for k, v in SAMPLE.items() if k != "answer"}]}, r'\["answer"\] must be a str'),
    ({"version": 1, "samples": [{**SAMPLE, "metadata": [1]}]}, r'\["metadata"\] must be an object'),
])
def test_a_malformed_request_is_refused_with_400_naming_what_is_wrong(rule_server, body, why):
    answer = rule_server.post(body, headers=auth())
    assert answer.status_code == 400
    assert re.search(why, answer.json()["error"]), answer.json()


def test_the_served_rule_scores_exactly_as_the_local_rule(rule_server):
    n = 300
    prompts = [f"{i}*2=" for i in range(n)]
    answers = [str(2 * i) for i in range(n)]
    responses = [str(2 * i) if i % 3 else f" {2 * i + 1}" for i in range(n)]
    finished = [i % 5 != 0 for i in range(n)]
    remote = RemoteReward(rule_server.url, batch_size=64, concurrency=3, token=TOKEN)
    remote.check()
    scores, stats = remote(prompts, responses, answers, finished)
    assert scores == exact_match(prompts, responses, answers, finished)
    assert 0 < sum(scores) < n and stats["remote_failures"] == 0


def test_a_failing_function_answers_500_and_the_client_counts_it(tmp_path):
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)
    server = ServeReward(f"{path}:fails_on_marker", "--num-workers", "1")
    try:
        answer = server.post({"version": 1, "samples": [SAMPLE, {**SAMPLE, "response": "bad"}]})
        assert answer.status_code == 500 and "raised" in answer.json()["error"]
        assert server.post({"version": 1, "samples": [SAMPLE]}).json()["scores"] == [1.0]
        remote = RemoteReward(server.url, batch_size=1, retries=1, backoff_s=0.01, failure_value=-1.0)
        scores, stats = remote(["p"] * 3, ["ok", "bad", "ok"], ["a"] * 3, [True] * 3)
        assert scores == [1.0, -1.0, 1.0] and stats["remote_failures"] == 1 and stats["remote_retries"] == 1
    finally:
        server.stop()


def test_a_bad_spec_exits_at_once_naming_it():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "rlhf_ds.cli", "serve-reward", "no_such_reward", "--port",
                           str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "'no_such_reward'" in done.stderr and "exact_match" in done.stderr


def trained_reward_model(path: Path) -> str:
    """A reward_hf-shaped directory: the micro value model with a head that is not zero (as trained)."""
    import torch

    from rlhf_ds.models.tiny import resolve_model_path
    from rlhf_ds.models.tokenizer import load_tokenizer
    from rlhf_ds.models.value_model import ValueModel

    source = resolve_model_path("tiny:llama-micro-value")
    model = ValueModel.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        model.value_head.weight.normal_()
        model.value_head.bias.fill_(0.5)
    model.save_pretrained(path)
    load_tokenizer(source).save_pretrained(path)
    return str(path)


def test_a_reward_model_is_scored_at_the_last_real_token(tmp_path):
    import torch

    from rlhf_ds.models.tokenizer import load_tokenizer
    from rlhf_ds.models.value_model import ValueModel

    path = trained_reward_model(tmp_path / "reward_hf")
    server = ServeReward(path, "--batch-size", "3")
    try:
        prompts, responses = ["12*3=", "4*4=", "7*8=", "1*1="], ["36", "1", "56789", ""]
        finished = [True, False, True, False]   # the last: an empty response, scored at the prompt's end
        remote = RemoteReward(server.url, batch_size=4)
        scores, _ = remote(prompts, responses, [""] * 4, finished)
    finally:
        server.stop()
    # the same model, one unpadded sequence at a time: prompt (with bos) + response (+ eos when finished)
    tokenizer, model = load_tokenizer(path), ValueModel.from_pretrained(path, dtype=torch.float32).eval()
    want = []
    for prompt, response, done in zip(prompts, responses, finished, strict=True):
        ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
        ids += [tokenizer.eos_token_id] if done else []
        with torch.no_grad():
            want.append(model(input_ids=torch.tensor([ids]))[0, -1].item())
    assert scores == pytest.approx(want, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 4   # four different sequences, four different scores
