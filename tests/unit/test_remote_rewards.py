"""The remote reward's client against a small server in this process (127.0.0.1 only) that misbehaves on
purpose: down at start, stopped between calls, slow past the deadline, answering 5xx, 4xx, malformed JSON
or the wrong number of scores. Each failure is retried only where it should be, counted, and scored
``failure_value`` (nothing else stands in for a score); past ``max_failure_fraction`` it stops the call
naming the URL and the last error; a broken answer is an error at once. Everything ends within seconds."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from reward_server import free_port

from rlhf_ds.config import load_config
from rlhf_ds.rewards import CombinedReward, RemoteReward, RewardFunctionError, RewardRunner, runner_from_config
from rlhf_ds.rewards.remote import remote_from_config
from rlhf_ds.rewards.schema import TOKEN_ENV

pytestmark = pytest.mark.timeout(60)   # nothing here may hang

FAIL = -7.0   # a failure_value no server below sends


def score_by_length(samples: list[dict]) -> list[float]:
    return [float(len(s["response"])) for s in samples]


class Endpoint:
    """A threaded HTTP server on a free loopback port. ``behave(samples, headers)`` gives each POST's
    (status, body): a dict (sent as JSON), bytes (sent as is), or a number of seconds to sleep first
    (``("sleep", seconds)``). Counts requests, and the most that were in flight at once."""

    def __init__(self, behave):
        self.behave, self.requests, self.in_flight, self.max_in_flight = behave, [], 0, 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append((body, dict(self.headers)))
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    status, answer = endpoint.behave(body["samples"], self.headers)
                    data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (its deadline)
                    pass
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False   # a handler still sleeping does not hold up stop()
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/score"

    def stop(self) -> None:
        """The server goes away: from now on connections to its port are refused."""
        self.server.shutdown()
        self.server.server_close()


def ok(samples, headers):
    return 200, {"version": 1, "scores": score_by_length(samples)}


@pytest.fixture
def endpoint():
    started = []

    def start(behave=ok) -> Endpoint:
        started.append(Endpoint(behave))
        return started[-1]

    yield start
    for e in started:
        e.stop()


def client(url: str, **kwargs) -> RemoteReward:
    settings = {"batch_size": 2, "concurrency": 2, "timeout_s": 5.0, "retries": 2, "backoff_s": 0.01,
                "failure_value": FAIL, "max_failure_fraction": 0.5, **kwargs}
    return RemoteReward(url, **settings)


def samples(responses: list[str], answers: list[str] | None = None):
    n = len(responses)
    return [f"p{i}" for i in range(n)], responses, answers or ["a"] * n, [True] * n


# ----------------------------------------------------------------------------- the happy path

def test_scores_come_back_in_order_batched_with_bounded_concurrency(endpoint):
    def slow_ok(samples, headers):
        time.sleep(0.05)
        return ok(samples, headers)

    server = endpoint(slow_ok)
    responses = ["x" * k for k in range(11)]
    scores, stats = client(server.url, batch_size=3, concurrency=2)(*samples(responses))
    assert scores == [float(k) for k in range(11)]
    assert sorted(len(body["samples"]) for body, _ in server.requests) == [2, 3, 3, 3]
    indices = sorted(s["metadata"]["index"] for body, _ in server.requests for s in body["samples"])
    assert indices == list(range(11))
    assert server.max_in_flight <= 2
    assert stats["remote_failures"] == stats["remote_timeouts"] == stats["remote_retries"] == 0
    assert stats["remote_mean"] == pytest.approx(5.0) and stats["remote_latency_s"] > 0


def test_the_request_carries_the_schema_headers_and_the_token(endpoint, monkeypatch):
    server = endpoint()
    client(server.url, headers=["X-Run: demo"], token="s3cret")(*samples(["r"], ["ans"]))
    body, headers = server.requests[0]
    assert body == {"version": 1, "samples": [{"prompt": "p0", "response": "r", "answer": "ans", "finished": True,
                                               "metadata": {"index": 0}}]}
    assert headers["Authorization"] == "Bearer s3cret" and headers["X-Run"] == "demo"
    assert headers["Content-Type"] == "application/json"
    # without reward.remote.token the environment's token is sent
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    cfg = load_config(None, [f"reward.remote.url={server.url}"])
    remote = remote_from_config(cfg.reward)
    assert remote is not None and remote.headers["Authorization"] == "Bearer from-env"


def test_an_empty_batch_sends_nothing(endpoint):
    server = endpoint()
    assert client(server.url)([], [], [], [])[0] == []
    assert not server.requests


# ----------------------------------------------------------------------------- faults

def test_a_server_down_at_start_is_an_error_naming_the_url(endpoint):
    url = f"http://127.0.0.1:{free_port()}/score"   # nobody listens there
    started = time.monotonic()
    with pytest.raises(RewardFunctionError, match=rf"reward.remote.url={url}: the start-up probe .*\(tries: 3\): "
                                                  r"connection error.*serve-reward"):
        client(url).check()
    # ... and runner_from_config probes before it builds anything
    with pytest.raises(RewardFunctionError, match="start-up probe"):
        runner_from_config(load_config(None, [f"reward.remote.url={url}", "reward.remote.backoff_s=0.01"]).reward)
    assert time.monotonic() - started < 10


def test_a_server_that_goes_away_mid_run_is_retried_then_stops_the_run(endpoint):
    server = endpoint()
    remote = client(server.url)
    remote.check()
    assert remote(*samples(["ab", "c"]))[0] == [2.0, 1.0]
    server.stop()
    started = time.monotonic()
    with pytest.raises(RewardFunctionError) as err:
        remote(*samples(["ab", "c", "d"]))
    message = str(err.value)
    assert f"reward.remote.url={server.url}" in message and "3 of 3 samples (100%)" in message
    assert "last error (failed, tries: 3): connection error" in message
    assert time.monotonic() - started < 5


def test_5xx_is_retried_with_backoff_then_counted_and_scored_failure_value(endpoint):
    def fails_on_bad(samples, headers):
        if any(s["response"] == "bad" for s in samples):
            return 503, b"overloaded"
        return ok(samples, headers)

    server = endpoint(fails_on_bad)
    started = time.monotonic()
    scores, stats = client(server.url, backoff_s=0.2, retries=2)(*samples(["aa", "bad", "ccc", "d", "ee", "f"]))
    # the batch holding "bad" failed 3 times (1 + 2 retries, waiting 0.2 then 0.4 s); the others scored
    assert scores == [FAIL, FAIL, 3.0, 1.0, 2.0, 1.0]
    assert stats["remote_failures"] == 1 and stats["remote_retries"] == 2 and stats["remote_timeouts"] == 0
    assert len(server.requests) == 2 + 3
    assert time.monotonic() - started >= 0.6
    assert stats["remote_mean"] == pytest.approx((2 * FAIL + 7.0) / 6)


def test_always_500_stops_the_run_with_the_url_and_the_answer(endpoint):
    server = endpoint(lambda samples, headers: (500, b"Internal error: model not loaded"))
    with pytest.raises(RewardFunctionError, match=r"4 of 4 samples.*last error \(failed, tries: 3\): HTTP 500: "
                                                  r"Internal error: model not loaded"):
        client(server.url)(*samples(["a", "b", "c", "d"]))
    assert len(server.requests) == 2 * 3


@pytest.mark.parametrize("status,hint", [(400, ""), (401, "reward.remote.token"), (413, "reward.remote.batch_size")])
def test_4xx_is_never_retried(endpoint, status, hint):
    server = endpoint(lambda samples, headers: (status, {"error": "no"}))
    with pytest.raises(RewardFunctionError, match=rf"last error \(failed, tries: 1\): HTTP {status}: .*{hint}"):
        client(server.url)(*samples(["a", "b"]))
    assert len(server.requests) == 1


def test_a_request_over_the_size_limit_fails_alone_when_the_rest_fits(endpoint):
    """A server's 413 for one big batch: that batch's samples score failure_value, counted, not retried."""
    def limit(samples, headers):
        if sum(len(s["response"]) for s in samples) > 100:
            return 413, {"error": "request body over the server's limit"}
        return ok(samples, headers)

    server = endpoint(limit)
    scores, stats = client(server.url, max_failure_fraction=0.5)(*samples(["x" * 200, "y", "a", "b"]))
    assert scores == [FAIL, FAIL, 1.0, 1.0] and stats["remote_failures"] == 1 and stats["remote_retries"] == 0
    assert len(server.requests) == 2


def test_a_slow_server_hits_the_deadline_which_is_not_retried(endpoint):
    def slow_on_marker(samples, headers):
        if any(s["response"] == "slow" for s in samples):
            time.sleep(3)
        return ok(samples, headers)

    server = endpoint(slow_on_marker)
    started = time.monotonic()
    scores, stats = client(server.url, timeout_s=0.5, max_failure_fraction=0.5)(*samples(["slow", "a", "bb", "c"]))
    assert time.monotonic() - started < 2.5
    assert scores == [FAIL, FAIL, 2.0, 1.0]
    assert stats["remote_timeouts"] == 1 and stats["remote_failures"] == 0 and stats["remote_retries"] == 0
    with pytest.raises(RewardFunctionError, match=r"last error \(timeout, tries: 1\): no answer within "
                                                  r"reward.remote.timeout_s=0.5 s"):
        client(server.url, timeout_s=0.5)(*samples(["slow", "a"]))


@pytest.mark.parametrize("answer,why", [
    (b"<html>not json", "not JSON"),
    ({"version": 1, "scores": [1.0]}, "1 scores for a request of 2 samples"),
    ({"version": 1, "scores": [1.0, 2.0, 3.0]}, "3 scores for a request of 2 samples"),
    ({"version": 2, "scores": [1.0, 2.0]}, "version"),
    ({"version": 1, "scores": [1.0, "high"]}, r"scores\[1\] = 'high' is not a finite number"),
    (b'{"version": 1, "scores": [1.0, NaN]}', r"scores\[1\] = nan is not a finite number"),
    ({"version": 1}, '"scores" must be a list'),
])
def test_an_answer_that_breaks_the_schema_stops_the_call_at_once(endpoint, answer, why):
    server = endpoint(lambda samples, headers: (200, answer))
    with pytest.raises(RewardFunctionError, match=rf"reward.remote.url=.* answered a request of 2 samples with .*{why}"):
        client(server.url, max_failure_fraction=1.0)(*samples(["a", "b"]))
    assert len(server.requests) == 1   # a server bug: not retried, and no score of it used


def test_failures_below_the_fraction_are_counted_not_hidden(endpoint):
    """At max_failure_fraction=1 nothing stops the call, and the failed samples are still failure_value
    and counted: the accounting never turns a failure into a plausible score."""
    server = endpoint(lambda samples, headers: (502, b"bad gateway"))
    scores, stats = client(server.url, max_failure_fraction=1.0, retries=0)(*samples(["a", "b", "c"]))
    assert scores == [FAIL] * 3 and stats["remote_failures"] == 2 and stats["remote_mean"] == FAIL


# ----------------------------------------------------------------------------- with rule functions

def test_remote_and_rule_rewards_combine_by_weight_and_failures_add_up(endpoint):
    server = endpoint()
    with RewardRunner(["exact_match"], [2.0], num_workers=1, failure_value=FAIL) as rules:
        combined = CombinedReward(rules, client(server.url), remote_weight=0.5)
        prompts, responses, answers, finished = samples(["a", "bb", "a"], ["a", "a", "b"])
        scores, stats = combined(prompts, responses, answers, finished)
        assert scores == [2.0 * 1 + 0.5 * 1, 2.0 * 0 + 0.5 * 2, 2.0 * 0 + 0.5 * 1]
        assert stats["exact_match/mean"] == pytest.approx(1 / 3) and stats["remote_mean"] == pytest.approx(4 / 3)
        assert stats["failures"] == 0 and stats["timeouts"] == 0
        server.stop()
        combined.remote.max_failure_fraction = 1.0
        scores, stats = combined(prompts, responses, answers, finished)
        assert scores == [2.0 + 0.5 * FAIL, 0.5 * FAIL, 0.5 * FAIL] and stats["failures"] == 2


def test_runner_from_config_builds_what_the_config_names(endpoint):
    server = endpoint()
    only_remote = runner_from_config(load_config(None, ["reward.functions=[]", f"reward.remote.url={server.url}",
                                                        "reward.remote.weight=3"]).reward)
    assert isinstance(only_remote, CombinedReward) and only_remote.rules is None
    assert only_remote(*samples(["ab"]))[0] == [6.0]
    both = runner_from_config(load_config(None, [f"reward.remote.url={server.url}"]).reward)
    assert isinstance(both, CombinedReward) and both.rules is not None and both.rules.names == ["exact_match"]
    both.close()
    assert len(server.requests) == 3   # two start-up probes (empty batches) and one call
    assert [len(body["samples"]) for body, _ in server.requests] == [0, 1, 0]

