import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from rmkit.judge._backends import (
    JudgeAuthenticationError,
    OpenAIChatBackend,
    TransformersChatBackend,
)
from rmkit.judge._labeler import CapabilityLabeler
from rmkit.judge._verdict import parse_verdict

CAPS = {"correctness": "the answer is factually right", "brevity": "says it in few words"}


def _responses(messages):
    text = messages[-1]["content"]
    a = text.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
    b = text.split("[Response B]\n")[1].split("\n\nWhich")[0]
    cap = text.split("Capability: ")[1].split(":")[0]
    return cap, a, b


def content_judge(messages):
    """Consistent judge: correctness favours texts with 'right', brevity the shorter text."""
    cap, a, b = _responses(messages)
    if cap == "correctness":
        return "A" if "right" in a else "B"
    return "Response A" if len(a) < len(b) else "Response B"


@pytest.fixture
def pairs():
    return pd.DataFrame({
        "prompt": ["q1", "q2", "q3", "q4"],
        "chosen": ["right, long answer here", "right", "right answer, long", "wrong"],
        "rejected": ["wrong", "wrong but much longer", "wrong", "right but long and wordy"],
    }, index=[10, 11, 12, 13])


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), ("B.", "B"), ("**A**", "A"), ("Answer: B", "B"), ("Response B is better.", "B"),
    ("A good question; hard to say.", None), ("the answer is a bit long", None), ("Both are fine", None),
    ("Response A or Response B", None), ("", None), (None, None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_consistent_judge_gives_labels(pairs):
    lab = CapabilityLabeler(CAPS, backend=content_judge, cache=False, verbose=0)
    out = lab.fit_transform(pairs)
    assert list(out.index) == [10, 11, 12, 13]
    np.testing.assert_array_equal(out["correctness"], [1, 1, 1, -1])
    np.testing.assert_array_equal(out["brevity"], [-1, 1, -1, 1])
    assert (lab.last_report_["agreement_rate"] == 1.0).all()
    assert (lab.last_report_["n_labelled"] == 4).all()


def test_swap_filter_drops_inconsistent_judgements(pairs):
    def biased(messages):  # consistent on correctness, always "A" (position bias) on brevity
        cap, _, _ = _responses(messages)
        return content_judge(messages) if cap == "correctness" else "A"

    lab = CapabilityLabeler(CAPS, backend=biased, cache=False, verbose=0).fit()
    out = lab.transform(pairs)
    assert out["brevity"].isna().all()
    np.testing.assert_array_equal(out["correctness"], [1, 1, 1, -1])
    rep = lab.last_report_
    assert rep.loc["brevity", "n_inconsistent"] == 4 and rep.loc["brevity", "agreement_rate"] == 0.0
    assert rep.loc["correctness", "agreement_rate"] == 1.0 and rep.loc["correctness", "coverage"] == 1.0


def test_partly_inconsistent_agreement_rate(pairs):
    def half(messages):  # flips its brevity verdict on the swapped request of pairs q1 and q2
        cap, a, b = _responses(messages)
        verdict = content_judge(messages)
        if cap == "brevity" and ("q1" in messages[-1]["content"] or "q2" in messages[-1]["content"]):
            return "A"
        return verdict

    lab = CapabilityLabeler(CAPS, backend=half, cache=False, verbose=0).fit()
    out = lab.transform(pairs)
    # q1: chosen is longer -> consistent answer is B/A; "A" twice is inconsistent. q2: chosen shorter -> A then B.
    assert np.isnan(out.loc[10, "brevity"]) and np.isnan(out.loc[11, "brevity"])
    assert out.loc[12, "brevity"] == -1 and out.loc[13, "brevity"] == 1
    assert lab.last_report_.loc["brevity", "agreement_rate"] == 0.5


def test_unparseable_answers_are_counted_not_labelled(pairs):
    def shaky(messages):
        cap, a, b = _responses(messages)
        if "q3" in messages[-1]["content"] and a.startswith("wrong"):  # only the swapped q3 request
            return "I cannot decide between them."
        return content_judge(messages)

    lab = CapabilityLabeler(CAPS, backend=shaky, cache=False, verbose=0).fit()
    out = lab.transform(pairs)
    assert out.loc[12].isna().all()
    rep = lab.last_report_
    assert (rep["n_unparseable"] == 1).all() and (rep["unparseable_answers"] == 1).all()
    assert (rep["n_inconsistent"] == 0).all() and (rep["agreement_rate"] == 1.0).all()
    assert (rep["n_labelled"] == 3).all()


class CountingBackend:
    cache_id = "counting-judge-v1"

    def __init__(self):
        self.calls = 0

    def complete(self, conversations):
        self.calls += len(conversations)
        return [content_judge(m) for m in conversations]


def test_disk_cache_makes_rerun_free(pairs, tmp_path):
    first = CountingBackend()
    lab = CapabilityLabeler(CAPS, backend=first, cache=str(tmp_path), verbose=0).fit()
    a = lab.transform(pairs)
    assert first.calls == 16 and lab.last_stats_["judge_calls"] == 16
    second = CountingBackend()
    b = CapabilityLabeler(CAPS, backend=second, cache=str(tmp_path), verbose=0).fit_transform(pairs)
    assert second.calls == 0
    pd.testing.assert_frame_equal(a, b)


def test_bad_inputs(pairs):
    with pytest.raises(ValueError, match="capabilities is empty"):
        CapabilityLabeler({}, backend=content_judge).fit()
    with pytest.raises(ValueError, match="unique"):
        CapabilityLabeler([("a", "x"), ("a", "y")], backend=content_judge).fit()
    with pytest.raises(ValueError, match="non-empty name and description"):
        CapabilityLabeler({"a": ""}, backend=content_judge).fit()
    with pytest.raises(TypeError, match="backend must be"):
        CapabilityLabeler(CAPS, backend=3).fit()
    lab = CapabilityLabeler(CAPS, backend=content_judge, cache=False, verbose=0).fit()
    with pytest.raises(ValueError, match="'rejected'"):
        lab.transform(pairs.drop(columns="rejected"))


# --- a real HTTP judge on loopback -----------------------------------------------------------


class _Judge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer, failures=0, key="secret"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer, self.failures, self.key = answer, failures, key
        self.lock, self.hits = threading.Lock(), 0


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        srv = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.hits += 1
            fail = srv.failures > 0
            srv.failures -= fail
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        if self.headers.get("Authorization") != f"Bearer {srv.key}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        if fail:
            return self._send(503, {"error": "overloaded"}, [("Retry-After", "0")])
        reply = srv.answer(request["messages"])
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})


@pytest.fixture
def serve():
    servers = []

    def start(answer, **kw):
        srv = _Judge(answer, **kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_http_backend_retries_503_then_succeeds(serve, pairs, monkeypatch):
    monkeypatch.setenv("RMKIT_TEST_JUDGE_KEY", "secret")
    srv, url = serve(content_judge, failures=3)
    backend = OpenAIChatBackend(url, "judge", api_key_env="RMKIT_TEST_JUDGE_KEY", backoff=0.01, max_workers=2)
    labeler = clone(CapabilityLabeler(CAPS, backend=backend, cache=False, verbose=0))  # as meta-estimators do
    out = labeler.fit_transform(pairs)
    assert labeler.backend_.n_retries_ == 3 and srv.hits == 16 + 3
    np.testing.assert_array_equal(out["correctness"], [1, 1, 1, -1])


def test_http_backend_gives_up_after_max_retries(serve, monkeypatch):
    monkeypatch.setenv("RMKIT_TEST_JUDGE_KEY", "secret")
    srv, url = serve(content_judge, failures=10)
    backend = OpenAIChatBackend(url, "judge", api_key_env="RMKIT_TEST_JUDGE_KEY", backoff=0.001, max_retries=2)
    with pytest.raises(RuntimeError, match="after 2 retries .*HTTP 503"):
        backend.complete([[{"role": "user", "content": "A or B?"}]])
    assert srv.hits == 3


def test_http_backend_fails_clearly_on_401(serve, monkeypatch):
    monkeypatch.setenv("RMKIT_TEST_JUDGE_KEY", "not-the-key")
    srv, url = serve(content_judge)
    backend = OpenAIChatBackend(url, "judge", api_key_env="RMKIT_TEST_JUDGE_KEY", backoff=0.01)
    with pytest.raises(JudgeAuthenticationError, match=r"HTTP 401.*RMKIT_TEST_JUDGE_KEY"):
        backend.complete([[{"role": "user", "content": "A or B?"}]])
    assert srv.hits == 1  # no retry on an authentication failure
    monkeypatch.delenv("RMKIT_TEST_JUDGE_KEY")
    with pytest.raises(JudgeAuthenticationError, match="is not set"):
        backend.complete([[{"role": "user", "content": "A or B?"}]])


def test_http_server_answering_from_the_local_model(serve, pairs, tiny, monkeypatch):
    monkeypatch.setenv("RMKIT_TEST_JUDGE_KEY", "secret")
    local = TransformersChatBackend(tiny, max_new_tokens=3)
    srv, url = serve(lambda messages: local.complete([messages])[0], failures=1)
    remote = OpenAIChatBackend(url, "tiny", api_key_env="RMKIT_TEST_JUDGE_KEY", backoff=0.01, max_workers=1,
                               max_tokens=3)
    caps, pairs = {"brevity": CAPS["brevity"]}, pairs.iloc[:2]
    via_http = CapabilityLabeler(caps, backend=remote, cache=False, verbose=0).fit()
    direct = CapabilityLabeler(caps, backend=local, cache=False, verbose=0).fit()
    np.testing.assert_array_equal(via_http.judge(pairs), direct.judge(pairs))
    assert remote.n_retries_ == 1
    # The tiny random model answers gibberish; whatever it says, each pair lands in exactly one bucket.
    labels = via_http.transform(pairs)
    rep = via_http.last_report_
    assert int(labels.notna().sum().sum()) == int(rep["n_labelled"].sum())
    assert (rep["n_labelled"] + rep["n_inconsistent"] + rep["n_unparseable"] == 2).all()


def test_local_backend_is_batch_invariant(tiny):
    convs = [[{"role": "user", "content": t}] for t in ("Which is better?", "A or B, answer now", "x")]
    one = TransformersChatBackend(tiny, max_new_tokens=4, batch_size=1).complete(convs)
    three = TransformersChatBackend(tiny, max_new_tokens=4, batch_size=3).complete(convs)
    assert one == three
