"""rmkit.serving: the scoring server (on loopback), query splitting, reward functions, model cards."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

import rmkit
from rmkit import ArmoRM, BackboneFeaturizer, GatedScalarizer
from rmkit.datasets import make_preference_pairs

from .conftest import requires_embedded

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from rmkit.serving import (  # noqa: E402
    QuerySplitError,
    QuerySplitter,
    RewardClient,
    RewardServerError,
    ServeConfig,
    reward_function,
    running_server,
    split_query,
)

TIMEOUT = 60  # seconds: every request of these tests is bounded


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pairs():
    return make_preference_pairs(24, random_state=0)


@pytest.fixture(scope="module")
def model(tiny, pairs):
    featurizer = BackboneFeaturizer(tiny, cache=False, verbose=0, max_length=128)
    gating = GatedScalarizer(hidden_size=8, max_epochs=3, validation_fraction=None)
    return ArmoRM(featurizer, pair_objective_column="category", gating=gating, cv=None, random_state=0).fit(pairs)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, max_body_bytes=64 * 1024, max_request_rows=16, batch_window_ms=20) as url:
        yield url


def _render(tokenizer, messages, response, closing=True):
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return text if closing else text[: text.rindex(response) + len(response)]


def _pointwise(pairs, n, side="chosen"):
    return pairs[["prompt", side]].head(n).rename(columns={side: "response"}).reset_index(drop=True)


def _metric(text, name, labels=""):
    """A sample's value from the Prometheus text (0 when absent)."""
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    m = re.search("^" + pattern + "$", text, flags=re.M)
    return float(m.group(1)) if m else 0.0


class GatedModel:
    """Wraps a model; ``predict`` waits for ``gate`` so tests control when batches finish."""

    def __init__(self, model):
        self.model_ = model  # trailing underscore: the server finds the backbone through it
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches = []

    def predict(self, X):
        self.entered.set()
        assert self.gate.wait(TIMEOUT), "the test never opened the gate"
        self.batches.append(len(X))
        return self.model_.predict(X)


@pytest.fixture
def gated(model):
    g = GatedModel(model)
    try:
        with running_server(g, max_queue_rows=4, max_request_rows=4, batch_window_ms=50) as url:
            yield url, g
            g.gate.set()
    finally:
        g.gate.set()


def _wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- query splitting

def test_split_query_with_the_tiny_template(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    # a query as OpenRLHF sends it: rendered prompt + response + the decoded closing token
    messages, response = split_query(_render(tokenizer, msgs, "It is 4.", closing=False) + "<|im_end|>", tokenizer)
    assert messages == msgs and response == "It is 4."
    multi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!\n\nHow can I help?"}, {"role": "user", "content": "Add 2+2."}]
    splitter = QuerySplitter(tokenizer)
    query = _render(tokenizer, multi, "4  \n")
    assert splitter.split(query) == (multi, "4")
    prompt = tokenizer.apply_chat_template(multi, add_generation_prompt=True, tokenize=False)
    assert splitter.split(query, prompt=prompt) == (multi, "4")
    # a truncated generation (no closing token) and trailing padding/eos tokens
    assert splitter.split(prompt + "4 and")[1] == "4 and"
    assert splitter.split(prompt + "Four<|im_end|><|endoftext|><|im_end|>")[1] == "Four"


def test_split_query_with_the_fallback_format(tiny):
    from transformers import AutoTokenizer

    from rmkit.backbones._templating import fallback_render
    from rmkit.testing import tiny_backbone

    tok = AutoTokenizer.from_pretrained(tiny_backbone(chat_template=False))
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another?"}]
    assert split_query(fallback_render(msgs, tok) + "Blue." + tok.eos_token, tok) == (msgs, "Blue.")


def test_split_query_refuses_what_it_cannot_split_exactly(tokenizer):
    splitter = QuerySplitter(tokenizer)
    with pytest.raises(QuerySplitError, match="does not start"):
        splitter.split("### User:\nHi\n\n### Assistant:\nHello")  # another template
    with pytest.raises(QuerySplitError, match="empty response"):
        splitter.split(_render(tokenizer, [{"role": "user", "content": "Hi"}], "x").replace("x<|im_end|>", ""))
    with pytest.raises(QuerySplitError, match="end of the user turn"):
        splitter.split("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nno end")


@requires_embedded
def test_split_query_with_the_embedded_template():
    from rmkit.backbones._loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    splitter = QuerySplitter(tok)
    plain = [{"role": "user", "content": "Write a haiku."}]
    query = _render(tok, plain, "Leaves fall.")
    assert query.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # default system
    assert splitter.split(query) == (plain, "Leaves fall.")  # re-rendering adds the same default system prompt
    own_system = [{"role": "system", "content": "You are terse."}] + plain
    assert splitter.split(_render(tok, own_system, "Leaves fall.")) == (own_system, "Leaves fall.")


# ---------------------------------------------------------------------------------- reward functions

def test_reward_function_has_trls_signature_and_matches_predict(model, pairs):
    rows = _pointwise(pairs, 4)
    expected = model.predict(rows)
    f = reward_function(model)
    assert f.__name__ == "rmkit_reward"
    plain = f(prompts=list(rows["prompt"]), completions=list(rows["response"]), completion_ids=[[1]] * 4,
              trainer_state=None)
    conv = f([[{"role": "user", "content": p}] for p in rows["prompt"]],
             [[{"role": "assistant", "content": r}] for r in rows["response"]])
    assert isinstance(plain, list) and all(isinstance(v, float) for v in plain)
    np.testing.assert_allclose(plain, expected, atol=1e-5)
    np.testing.assert_allclose(conv, expected, atol=1e-5)
    np.testing.assert_allclose(reward_function(model, batch_size=1)(list(rows["prompt"]), list(rows["response"])),
                               expected, atol=1e-5)
    with pytest.raises(ValueError, match="completions\\[1\\] is empty"):
        f(["a", "b"], ["fine", "  "])
    assert reward_function(model, empty_reward=-5.0)(["a", "b"], ["fine", " "])[1] == -5.0
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        f(["a", "b"], ["x"])


# ---------------------------------------------------------------------------------- the server

def test_get_reward_answers_openrlhf_requests_like_predict(server, model, pairs, tokenizer):
    rows = _pointwise(pairs, 6)
    expected = model.predict(rows)
    queries = [_render(tokenizer, [{"role": "user", "content": p}], r, closing=False) + "<|im_end|>"
               for p, r in zip(rows["prompt"], rows["response"])]
    r = httpx.post(server + "/get_reward", json={"query": queries}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"rewards", "scores"} and body["rewards"] == body["scores"]
    np.testing.assert_allclose(body["rewards"], expected, atol=1e-5)
    # newer clients: prompts + labels
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in rows["prompt"]]
    r = httpx.post(server + "/get_reward", json={"query": queries, "prompts": prompts, "labels": [None] * 6},
                   timeout=TIMEOUT)
    np.testing.assert_allclose(r.json()["rewards"], expected, atol=1e-5)


def test_score_endpoint_rows_pairs_and_explanations(server, model, pairs):
    rows = _pointwise(pairs, 3)
    r = httpx.post(server + "/score", json={"rows": rows.to_dict("records"), "explain": True}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["rewards"], model.predict(rows), atol=1e-5)
    expl = model.explain(rows)
    assert len(body["explanations"]) == 3
    first = pd.DataFrame(body["explanations"][0])
    assert list(first["objective"]) == list(model.objective_names_)
    np.testing.assert_allclose(first["contribution"].sum(), body["rewards"][0], atol=1e-5)
    np.testing.assert_allclose(first["gating_weight"], expl[expl["row"] == 0]["gating_weight"], atol=1e-6)
    one = httpx.post(server + "/score", json={"messages": [{"role": "user", "content": rows["prompt"][0]}],
                                              "response": rows["response"][0]}, timeout=TIMEOUT).json()
    np.testing.assert_allclose(one["rewards"], body["rewards"][:1], atol=1e-5)
    two = pairs[["prompt", "chosen", "rejected"]].head(2)
    r = httpx.post(server + "/score", json={"rows": two.to_dict("records")}, timeout=TIMEOUT).json()
    np.testing.assert_allclose(r["p_chosen"], model.predict(two), atol=1e-5)
    np.testing.assert_allclose(r["rewards_chosen"], model.predict(_pointwise(pairs, 2)), atol=1e-5)
    np.testing.assert_allclose(r["rewards_rejected"], model.predict(_pointwise(pairs, 2, "rejected")), atol=1e-5)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 422, "must be a JSON object"),
    (b'{"prompts": ["x"]}', 422, "missing the key 'query'"),
    (b'{"query": "one string"}', 422, "must be a list"),
    (b'{"query": []}', 422, "empty list"),
    (b'{"query": [1]}', 422, "query[0] must be a str"),
    (b'{"query": ["a"], "prompts": ["a", "b"]}', 422, "'prompts' has 2 items"),
    (b'{"query": ["no template here"]}', 422, "query[0]: The query does not start"),
    (json.dumps({"query": ["q"] * 17}).encode(), 413, "at most 16"),
    (json.dumps({"query": ["x" * 70_000]}).encode(), 413, "limit"),
])
def test_get_reward_errors_have_documented_codes(server, body, status, message):
    r = httpx.post(server + "/get_reward", content=body, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize("payload, message", [
    ({"rows": [{"prompt": "hi", "respnse": "typo"}]}, "unknown key(s) ['respnse']"),
    ({"rows": [{"prompt": "hi"}]}, "missing the column 'response'"),
    ({"rows": [{"prompt": "hi", "response": 3}]}, "must hold strings"),
    ({"rows": [{"prompt": "hi", "response": "  "}]}, "empty text"),
    ({"rows": []}, "empty list"),
    ({"rows": ["hi"]}, "rows[0] must be a dict"),
    ({"rows": [{"prompt": "hi", "response": "yo"}], "explain": "yes"}, "'explain' must be true or false"),
])
def test_score_errors_are_422_and_the_server_keeps_serving(server, model, pairs, payload, message):
    r = httpx.post(server + "/score", json=payload, timeout=TIMEOUT)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    rows = _pointwise(pairs, 1)
    ok = httpx.post(server + "/score", json={"rows": rows.to_dict("records")}, timeout=TIMEOUT)
    np.testing.assert_allclose(ok.json()["rewards"], model.predict(rows), atol=1e-5)


def test_chunked_oversized_body_is_refused(server):
    def chunks():
        for _ in range(100):
            yield b" " * 1024  # 100 KiB without a Content-Length header

    r = httpx.post(server + "/get_reward", content=chunks(), timeout=TIMEOUT)
    assert r.status_code == 413
    assert httpx.get(server + "/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_health_and_metrics(server):
    health = httpx.get(server + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["model"] == "ArmoRM" and health["backbone"]
    httpx.post(server + "/get_reward", content=b"{", timeout=TIMEOUT)
    text = httpx.get(server + "/metrics", timeout=TIMEOUT).text
    assert _metric(text, "rmkit_requests_total", 'endpoint="get_reward",status="400"') >= 1
    for name in ("rmkit_request_latency_seconds_bucket", "rmkit_batch_rows_bucket", "rmkit_batch_requests_count",
                 "rmkit_queue_rows"):
        assert name in text


def test_api_key(model, pairs):
    rows = _pointwise(pairs, 1).to_dict("records")
    with running_server(model, api_key="s3cret") as url:
        assert httpx.post(url + "/score", json={"rows": rows}, timeout=TIMEOUT).status_code == 401
        wrong = httpx.post(url + "/score", json={"rows": rows}, headers={"Authorization": "Bearer nope"},
                           timeout=TIMEOUT)
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/metrics", timeout=TIMEOUT).status_code == 401
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200  # for load balancers' probes
        ok = httpx.post(url + "/score", json={"rows": rows}, headers={"Authorization": "Bearer s3cret"},
                        timeout=TIMEOUT)
        assert ok.status_code == 200


def test_concurrent_requests_are_batched_and_a_full_queue_answers_429(gated, model, pairs):
    url, g = gated
    rows = _pointwise(pairs, 4)
    expected = model.predict(rows)
    results = {}

    def post(i):
        results[i] = httpx.post(url + "/score", json={"rows": rows.iloc[[i]].to_dict("records")}, timeout=TIMEOUT)

    first = threading.Thread(target=post, args=(0,))
    first.start()
    assert g.entered.wait(TIMEOUT)  # request 0 is being scored (alone) and holds the model
    others = [threading.Thread(target=post, args=(i,)) for i in (1, 2, 3)]
    for t in others:
        t.start()
    _wait_for(lambda: httpx.get(url + "/health", timeout=TIMEOUT).json()["queue_rows"] == 3, "3 queued rows")
    full = httpx.post(url + "/score", json={"rows": rows.head(2).to_dict("records")}, timeout=TIMEOUT)
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    g.gate.set()
    for t in [first] + others:
        t.join(TIMEOUT)
    for i in range(4):
        assert results[i].status_code == 200
        np.testing.assert_allclose(results[i].json()["rewards"], expected[i:i + 1], atol=1e-5)
    assert g.batches == [1, 3]  # the three waiting requests went into one predict call
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    assert _metric(text, "rmkit_batch_requests_count") == 2
    assert _metric(text, "rmkit_batch_requests_sum") == 4
    assert _metric(text, "rmkit_batch_requests_bucket", 'le="2.0"') == 1  # one batch of 1, one of 3
    assert _metric(text, "rmkit_batch_rows_sum") == 4
    assert _metric(text, "rmkit_requests_total", 'endpoint="score",status="429"') == 1
    assert _metric(text, "rmkit_queue_rows") == 0


def test_client_disconnects_do_not_kill_the_server(gated, model, pairs):
    url, g = gated
    rows = _pointwise(pairs, 2)
    # 1. a client that gives up while its request is being scored
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/score", json={"rows": rows.head(1).to_dict("records")}, timeout=0.5)
    assert g.entered.wait(TIMEOUT)
    # 2. a client that disconnects in the middle of sending its body
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"rows\": [")
    g.gate.set()
    r = httpx.post(url + "/score", json={"rows": rows.to_dict("records")}, timeout=TIMEOUT)
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["rewards"], model.predict(rows), atol=1e-5)
    _wait_for(lambda: _metric(httpx.get(url + "/metrics", timeout=TIMEOUT).text, "rmkit_requests_total",
                              'endpoint="score",status="499"') == 1, "the aborted upload to be counted")


def test_async_client_and_remote_reward_function(server, model, pairs):
    rows = _pointwise(pairs, 3)
    expected = model.predict(rows)

    async def main():
        async with RewardClient(server) as client:
            assert (await client.health())["status"] == "ok"
            scored = await client.score(rows.to_dict("records"))
            f = client.reward_function()
            remote = await f(prompts=list(rows["prompt"]), completions=list(rows["response"]), trainer_state=None)
            with pytest.raises(RewardServerError, match="HTTP 422"):
                await client.get_reward(["not rendered with the template"])
            return scored["rewards"], remote, f.__name__

    scored, remote, name = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    np.testing.assert_allclose(scored, expected, atol=1e-5)
    np.testing.assert_allclose(remote, expected, atol=1e-5)
    assert name == "rmkit_remote_reward"


def test_openrlhf_remote_reward_client(server, model, pairs, tokenizer):
    """OpenRLHF's own HTTP reward client (its agent executor), imported without its heavy dependencies."""
    agent = pytest.importorskip("openrlhf.utils.agent", reason="install with: pip install --no-deps openrlhf "
                                "aiohttp pylatexenc")
    rows = _pointwise(pairs, 2)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in rows["prompt"]]
    queries = [p + r + "<|im_end|>" for p, r in zip(prompts, rows["response"])]
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=server + "/get_reward")
    answers = asyncio.run(asyncio.wait_for(executor._fetch_rewards_via_http(queries, prompts, [None, None]), TIMEOUT))
    got = [v for a in answers for v in a["rewards"]]
    np.testing.assert_allclose(got, model.predict(rows), atol=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_request_rows"):
        ServeConfig(max_request_rows=10, max_queue_rows=5)
    with pytest.raises(ValueError, match="max_batch_rows must be a positive integer"):
        ServeConfig(max_batch_rows=0)


# ---------------------------------------------------------------------------------- real trainers and the CLI

@pytest.mark.slow
def test_trl_grpo_trainer_trains_on_rmkit_rewards(model, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from rmkit.testing import tiny_backbone

    seen = []
    f = reward_function(model, empty_reward=0.0)

    def rmkit_reward(prompts, completions, **kwargs):
        out = f(prompts, completions, **kwargs)
        seen.append((prompts, completions, out))
        return out

    dataset = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say {w}."}]
                                                     for w in ("hi", "yes", "no", "ok")]})
    args = trl.GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=8, max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                          bf16=False, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = trl.GRPOTrainer(model=tiny_backbone(seed=1), reward_funcs=rmkit_reward, args=args,
                              train_dataset=dataset)
    trainer.train()
    logged = [h["rewards/rmkit_reward/mean"] for h in trainer.state.log_history if "rewards/rmkit_reward/mean" in h]
    assert len(seen) == 2 and len(logged) == 2
    for (prompts, completions, rewards), mean in zip(seen, logged):
        assert len(rewards) == 4 and isinstance(prompts[0], list)  # conversational prompts reached the function
        scored = [i for i, c in enumerate(completions) if c[0]["content"].strip()]
        assert scored, "every completion was empty"
        direct = model.predict(pd.DataFrame({"messages": [prompts[i] for i in scored],
                                             "response": [completions[i][0]["content"] for i in scored]}))
        np.testing.assert_allclose([rewards[i] for i in scored], direct, atol=1e-5)
        assert mean == pytest.approx(np.mean(rewards), abs=1e-5)  # the rewards flowed into the training log


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serve_and_model_card(model, pairs, tokenizer, tmp_path, capsys):
    path = rmkit.save(model, tmp_path / "rm")
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: rmkit\n") and "# ArmoRM reward model" in card
    assert model.featurizer_.backbone_fingerprint_ in card and "`verbosity`" in card
    assert "## Limitations and caveats" in card and "scikit-learn" in card
    from rmkit.__main__ import main

    assert main(["serve", str(tmp_path / "m.joblib")]) == 1  # pickles need --trust-pickle
    port = _free_port()
    env = {**os.environ, "RM_KEY": "k3y", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "rmkit", "serve", str(path), "--port", str(port),
                             "--api-key-env", "RM_KEY", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: proc.poll() is not None or _healthy(url), "the server to start", timeout=120)
        assert proc.poll() is None, proc.stdout.read().decode()
        rows = _pointwise(pairs, 2)
        queries = [_render(tokenizer, [{"role": "user", "content": p}], r) for p, r in zip(rows["prompt"],
                                                                                           rows["response"])]
        r = httpx.post(url + "/get_reward", json={"query": queries}, headers={"Authorization": "Bearer k3y"},
                       timeout=TIMEOUT)
        np.testing.assert_allclose(r.json()["rewards"], model.predict(rows), atol=1e-5)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0  # Ctrl-C: a graceful stop
    assert main(["info", str(path)]) == 0
    assert capsys.readouterr().out.strip() == card.strip()


def _healthy(url):
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_saved_folder_with_card_loads_and_card_can_be_enriched(tmp_path):
    from sklearn.linear_model import Ridge

    X, y = np.eye(3), np.array([0.0, 1.0, 2.0])
    path = rmkit.save(Ridge().fit(X, y), tmp_path / "ridge")
    assert (path / "README.md").is_file()
    np.testing.assert_allclose(rmkit.load(path).predict(X), Ridge().fit(X, y).predict(X))  # still verifies
    rmkit.write_model_card(path, training_data={"pairs": 3, "sources": ["synthetic"]},
                           evaluation={"pairwise accuracy": 0.75})
    text = (path / "README.md").read_text()
    assert "| sources | synthetic |" in text and "| pairwise accuracy | 0.7500 |" in text
    rmkit.load(path)
    rmkit.save(Ridge().fit(X, y), path)  # a folder with a card is still recognised as an rmkit save
    assert "| pairs | 3 |" not in (path / "README.md").read_text()


def test_importing_the_adapters_loads_no_server_or_torch():
    code = ("import sys, rmkit.serving as s; s.reward_function; s.split_query; s.RewardClient; "
            "loaded = [m for m in ('torch', 'fastapi', 'uvicorn', 'httpx', 'prometheus_client') if m in sys.modules]; "
            "assert not loaded, loaded")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
