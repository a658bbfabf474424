"""Remote roles without a second process: top-K rows, URL options, the HTTP layer against an
in-process server, token names, and the engine running remote evaluations beside the local
lanes."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from eft_local import sampler
from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.presets import load_config, preset_from_paths, public_url, remote_spec
from eft_local.remote import http as remote_http
from eft_local.remote.exact import ExactClient, decode_rows, encode_rows, prefix_hash
from eft_local.remote.http import Endpoint, RemoteError, Traffic
from eft_local.remote.model import Abandoned
from eft_local.remote.openai import OpenAIClient
from eft_local.remote.topk import SUM_RESOLUTION, check_entries, topk_row
from tests.clihelp import write_presets
from tests.fakes import FakeModel


# -- top-K rows ---------------------------------------------------------------------------------
def test_a_top_k_row_spreads_the_rest_evenly() -> None:
    row = topk_row([3, 1], [math.log(0.5), math.log(0.3)], 10)
    p = np.exp(row.astype(np.float64))
    assert p[3] == pytest.approx(0.5) and p[1] == pytest.approx(0.3)
    others = np.delete(p, [1, 3])
    assert np.allclose(others, 0.2 / 8) and p.sum() == pytest.approx(1.0)


def test_a_top_k_row_with_every_id_is_the_distribution() -> None:
    lps = np.log(np.array([0.1, 0.2, 0.7]))
    np.testing.assert_allclose(topk_row([2, 0, 1], lps[[2, 0, 1]], 3), lps, rtol=1e-6)


def test_a_top_k_row_under_a_negative_weight_stays_finite() -> None:
    """Why the rest is spread, not cut: down-scaling weighs large_base by -beta."""
    row = topk_row([0, 1], [math.log(0.6), math.log(0.3)], 6)
    other = np.log(np.full(6, 1 / 6, dtype=np.float32))
    mix = sampler.mix_logits(np.stack([other, row]), np.array([1.0, -1.0], np.float32),
                             np.ones(6, dtype=bool))
    assert np.isfinite(mix).all()


def confident_answer(k: int, kth: float) -> list[float]:
    """K log-probs of a confident position: one token holds nearly everything, the other
    K - 1 sit at ``kth``; their probabilities sum to a little over 1, as float32
    log-probs can."""
    rest = (k - 1) * math.exp(kth)
    return [math.log1p(-rest) + 1e-12, *[kth] * (k - 1)]


def test_a_confident_top_k_row_keeps_its_tail_just_below_the_k_th_entry() -> None:
    """The issue's measurement: a top 100 summing to more than 1 over 1,000 ids gave the
    tail -75.9 while the K-th entry was -14.5 (the leftover floored at 1e-30)."""
    lps = confident_answer(100, -14.5)
    assert math.fsum(math.exp(x) for x in lps) > 1
    row = topk_row(list(range(100)), lps, 1000, top_k=100)
    tail = float(row[500])
    assert tail <= -14.5
    assert tail >= math.log(SUM_RESOLUTION / 900) - 1e-4  # about -20.6, never -76
    assert (row[100:] == row[500]).all()


def test_a_tail_share_above_the_k_th_entry_is_held_at_it() -> None:
    """Two entries leave 0.49 over two ids: an even share (0.245) would put each tail
    token above the K-th entry (0.01), which no tail token can be."""
    row = topk_row([0, 1], [math.log(0.5), math.log(0.01)], 4, top_k=2)
    assert row[2] == row[3] == pytest.approx(math.log(0.01))


def test_an_entry_beyond_the_k_does_not_bound_the_tail() -> None:
    """vLLM adds the position's own token to the top K wherever it ranks: a token far down
    says nothing about the others outside the top K."""
    row = topk_row([0, 1, 9], [math.log(0.6), math.log(0.3), math.log(1e-9)], 10, top_k=2)
    assert row[9] == pytest.approx(math.log(1e-9))
    assert row[5] == pytest.approx(math.log((0.1 - 1e-9) / 7), rel=1e-5)


def confident_rows(width: int = 1024) -> dict[str, np.ndarray]:
    """A confident position of a family, as engines compute log-probs (float32): every
    model puts nearly everything on id 7 and agrees on the next 19 (ids 100..118, about
    -16.5); the rest sit near -30 under large_base, -24 under the small base and the large
    fine-tune. Seeded where large_base's top 20 sum past 1 after float32 rounding."""
    rng = np.random.default_rng(2)
    rows = {}
    for role, tail in (("large_base", -30.0), ("small_base", -24.0), ("large_ft", -24.0)):
        logits = rng.normal(tail, 1.0, width).astype(np.float32)
        logits[100:119] = rng.normal(-16.5, 0.3, 19)
        logits[7] = 0.0
        shifted = logits - logits.max()
        rows[role] = shifted - np.log(np.exp(shifted).sum(dtype=np.float32))
    return rows


def test_down_scaling_at_a_confident_position_draws_what_some_model_ranks() -> None:
    """The down formula weighs large_base by -beta: where its top 20 sum to 1 or more,
    the tail was floored at 1e-30 / V, which became +76 x beta, and the draw was a token
    outside every model's top 20 (id 438 here). Now it is the all-local mix's."""
    rows = confident_rows()
    lb = rows["large_base"]
    top = np.argsort(-lb)[:20]
    answer = [float(x) for x in lb[top]]
    assert math.fsum(math.exp(x) for x in answer) > 1  # confident: no leftover to read
    remote = topk_row([int(t) for t in top], answer, lb.size, top_k=20)
    weights = np.array([1.0, 1.0, -1.0], np.float32)  # small_base, large_ft, large_base
    allowed = np.ones(lb.size, dtype=bool)

    def draw(large: np.ndarray) -> int:
        stack = np.stack([rows["small_base"], rows["large_ft"], large])
        return int(np.argmax(sampler.mix_logits(stack, weights, allowed)))

    ranked = set().union(*(np.argsort(-r)[:20].tolist() for r in rows.values()))
    assert draw(remote) in ranked
    assert draw(remote) == draw(lb) == 7


def endpoint(url: str = "http://127.0.0.1:9", **kw: object) -> Endpoint:
    return Endpoint(url, role="large_base", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("ids", "lps", "words"), [
    ([1, 2], [-1.0, -2.0], "answered 2 log-prob(s) at position 7, fewer than top_k 3"),
    ([1, 2, 99], [-1.0, -2.0, -3.0], "token id 99 at position 7, outside its vocabulary"),
    ([1, 2, 3], [-1.0, float("nan"), -3.0], "not a number <= 0"),
])
def test_bad_top_k_answers_are_one_line(ids: list[int], lps: list[float], words: str) -> None:
    with pytest.raises(RemoteError) as err:
        check_entries(endpoint(), ids, lps, width=10, top_k=3, where="at position 7")
    assert str(err.value).startswith("remote large_base (http://127.0.0.1:9): ")
    assert words in str(err.value) and "\n" not in str(err.value)


# -- model sources --------------------------------------------------------------------------------
def test_url_options_after_the_hash() -> None:
    spec = preset_from_paths(["large_base=http://gpu:8080/#api=openai&top_k=20&model=m"
                              "&key=GPU_KEY&timeout=2.5", "small_ft=a.gguf",
                              "small_base=b.gguf"]).models["large_base"]
    assert (spec.url, spec.api, spec.top_k, spec.model, spec.api_key_env, spec.timeout) == (
        "http://gpu:8080", "openai", 20, "m", "GPU_KEY", 2.5)
    assert spec.remote and spec.describe() == "http://gpu:8080 (api=openai, model=m, top_k=20)"


@pytest.mark.parametrize(("url", "words"), [
    ("http://h:1#api=grpc", "api 'grpc' is not one of llama-server, openai, eft-local"),
    ("http://h:1#top_k=many", "top_k='many' is not a whole number"),
    ("http://h:1#top_k=0", "top_k must be an integer in [1,"),
    ("http://h:1#colour=red", "unknown remote option 'colour'"),
    ("http://me:pw@h:1", "put no user name or password in the URL"),
    ("http://h:99999", "has an invalid port"),
    ("http:///nohost", "is not an http:// or https:// URL with a host"),
    ("http://h:1#timeout=-1", "timeout must be seconds in (0,"),
    ("http://h:1#key=NOT-A-NAME", "is not an environment variable name"),
])
def test_bad_url_options_are_one_line(url: str, words: str) -> None:
    with pytest.raises(EftError) as err:
        preset_from_paths([f"large_base={url}"])
    assert words in str(err.value) and "pw" not in str(err.value)


def test_models_toml_takes_remote_models(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    write_presets(path, """
[presets.far]
[presets.far.models]
small_ft = { bundled = "small_ft.gguf" }
small_base = { bundled = "small_base.gguf" }
[presets.far.models.large_base]
url = "https://gpu.example:8443/v1"
api = "openai"
model = "llama-70b"
top_k = 100
api_key_env = "GPU_KEY"
timeout = 30
""")
    spec = load_config(user=path).get("far").models["large_base"]
    assert (spec.url, spec.api, spec.model, spec.top_k, spec.api_key_env, spec.timeout) == (
        "https://gpu.example:8443/v1", "openai", "llama-70b", 100, "GPU_KEY", 30.0)


@pytest.mark.parametrize(("entry", "words"), [
    ('{ url = "http://h:1", n_ctx = 512 }', "n_ctx does not apply to a remote model"),
    ('{ path = "a.gguf", top_k = 5 }', "top_k goes with url"),
    ('{ url = "http://h:1#top_k=5" }', "options as keys"),
    ('{ url = "http://h:1", path = "a.gguf" }', "give exactly one of path, bundled, hf or url"),
])
def test_bad_remote_entries_in_models_toml(tmp_path: Path, entry: str, words: str) -> None:
    path = tmp_path / "models.toml"
    write_presets(path, f"[presets.p]\nformula = 'a'\n[presets.p.models]\na = {entry}\n")
    with pytest.raises(EftError) as err:
        load_config(user=path)
    assert words in str(err.value) and "model 'a'" in str(err.value)


def test_public_url_shows_no_secret() -> None:
    assert public_url("https://u:pw@h:8/v1?key=abc#top_k=2") == "https://h:8/v1"


# -- the HTTP layer ---------------------------------------------------------------------------
@contextmanager
def http_server(handle: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[tuple[str, list]]:
    """An in-process HTTP server calling ``handle(request)``; yields its URL and the
    requests seen (method, path, headers)."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            seen.append(("GET", self.path, dict(self.headers)))
            handle(self)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            seen.append(("POST", self.path, dict(self.headers)))
            handle(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def reply(req: BaseHTTPRequestHandler, status: int, body: object,
          headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    req.send_response(status)
    for k, v in (headers or {}).items():
        req.send_header(k, v)
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_http, "BACKOFF_SECONDS", 0.01)


def test_a_busy_engine_is_asked_again_with_backoff() -> None:
    count = {"n": 0}

    def handle(req: BaseHTTPRequestHandler) -> None:
        count["n"] += 1
        if count["n"] <= 2:
            reply(req, 503, {"error": {"message": "busy"}}, {"Retry-After": "0"})
        else:
            reply(req, 200, {"ok": True})

    with http_server(handle) as (url, seen):
        ep = endpoint(url)
        assert ep.json("GET", "/x") == {"ok": True}
        assert len(seen) == 3 and ep.traffic.retries == 2 and ep.traffic.requests == 3


def test_an_engine_error_is_not_retried_and_is_one_line() -> None:
    with http_server(lambda req: reply(req, 500, {"error": {"message": "boom\nagain"}})) as (
            url, seen), pytest.raises(RemoteError) as err:
        endpoint(url).json("POST", "/x", {})
    assert len(seen) == 1
    assert str(err.value) == f"remote large_base ({url}): answered HTTP 500: boom\\nagain"


def test_the_key_comes_from_the_environment_and_is_never_shown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_KEY", "s3cret-key")
    with http_server(lambda req: reply(req, 401, {"error": {"message": "bad key"}})) as (
            url, seen), pytest.raises(RemoteError) as err:
        endpoint(url, api_key_env="GPU_KEY").json("GET", "/x")
    assert seen[0][2]["Authorization"] == "Bearer s3cret-key"
    assert "s3cret" not in str(err.value) and "HTTP 401" in str(err.value)
    monkeypatch.delenv("GPU_KEY")
    with pytest.raises(EftError) as missing:
        endpoint(url, api_key_env="GPU_KEY")
    assert "the environment variable GPU_KEY" in str(missing.value)


def test_a_slow_engine_times_out_with_504() -> None:
    def handle(req: BaseHTTPRequestHandler) -> None:
        time.sleep(1.0)
        reply(req, 200, {})

    with http_server(handle) as (url, seen), pytest.raises(RemoteError) as err:
        endpoint(url, timeout=0.2).json("GET", "/slow")
    assert err.value.status == 504 and "no answer within 0.2 s" in str(err.value)
    assert len(seen) == 1  # not asked twice


def test_a_refused_connection_is_tried_a_bounded_number_of_times() -> None:
    from tests.remotehelp import free_port

    url = f"http://127.0.0.1:{free_port()}"
    ep = endpoint(url)
    with pytest.raises(RemoteError) as err:
        ep.json("GET", "/x")
    assert "connection refused" in str(err.value)
    assert f"after {remote_http.RETRIES + 1} attempts" in str(err.value)
    assert ep.traffic.retries == remote_http.RETRIES


def test_rows_of_the_wrong_size_are_refused() -> None:
    def handle(req: BaseHTTPRequestHandler) -> None:
        reply(req, 200, encode_rows(np.zeros((2, 4), np.float32)),
              {"X-Eft-Rows": "2", "X-Eft-Width": "5"})

    with http_server(handle) as (url, _seen):
        client = ExactClient(endpoint(url), role=None, model=None, width=5)
        with pytest.raises(RemoteError) as err:
            client.rows([1, 2], [3], all_rows=True)
    assert "answered 32 bytes for 2 x 5 rows" in str(err.value)


def test_the_wire_format_round_trips() -> None:
    rows = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    data = encode_rows(rows)
    assert len(data) == 3 * 7 * 4 and data[:4] == rows[0, 0].astype("<f4").tobytes()
    np.testing.assert_array_equal(decode_rows(data, 3, 7), rows)
    assert decode_rows(data, 3, 8) is None
    assert prefix_hash([1, 2, 3]) != prefix_hash([1, 2, 4]) and len(prefix_hash([])) == 32


# -- token names in OpenAI answers ---------------------------------------------------------------
def openai_client(pieces: list[bytes], top_k: int = 2) -> OpenAIClient:
    return OpenAIClient(endpoint(), model="m", width=len(pieces), top_k=top_k, pieces=pieces)


def test_token_ids_and_unambiguous_texts_name_tokens() -> None:
    client = openai_client([b"a", b"b", b"c", b"d"])
    row = client._row({"token_id:2": -0.1, "token_id:0": -3.0}, "here")
    assert row[2] == pytest.approx(-0.1) and row[0] == pytest.approx(-3.0)
    row = client._row({"c": -0.1, "a": -3.0}, "here")
    assert row[2] == pytest.approx(-0.1)


def test_an_ambiguous_token_text_is_an_error() -> None:
    client = openai_client([b"a", b"\xff", b"\xfe", b"d"])  # both decode to U+FFFD
    with pytest.raises(RemoteError) as err:
        client._row({"\ufffd": -0.1, "a": -3.0}, "at position 3")
    assert "which ids [1, 2] all decode to" in str(err.value)


# -- the engine: remote evaluations beside the local lanes -------------------------------------
class FakeRemote(FakeModel):
    """A fake model that counts as remote; its decode can wait for an event."""

    remote = True

    def __init__(self, *, wait_for: threading.Event | None = None,
                 release: threading.Event | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.traffic = Traffic()
        self.wait_for, self.release = wait_for, release
        self.saw: bool | None = None
        self.abandoned = 0
        self.started = threading.Event()

    def decode(self, parts, out=None):  # noqa: ANN001, ANN201 - FakeModel.decode's
        self.started.set()
        if self.wait_for is not None:
            self.saw = self.wait_for.wait(timeout=10)
        if self.release is not None:
            self.release.wait(timeout=10)
        self.traffic.requests += 1
        self.traffic.received += 4 * self.n_vocab
        return super().decode(parts, out)

    def abandon(self) -> None:
        self.abandoned += 1


class Signalling(FakeModel):
    """A local fake that sets an event when it evaluates (or raises)."""

    def __init__(self, *, done: threading.Event, fail: bool = False,
                 after: threading.Event | None = None, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.done, self.fail, self.after = done, fail, after

    def decode(self, parts, out=None):  # noqa: ANN001, ANN201 - FakeModel.decode's
        rows = super().decode(parts, out)
        self.done.set()
        if self.after is not None:
            self.after.wait(timeout=10)
        if self.fail:
            raise EftError("local model failed")
        return rows


def engine_with(remote: FakeModel, local: FakeModel) -> Engine:
    return Engine({"large_base": remote, "small_ft": local}, template_role="small_ft",
                  allowed=np.ones(48, dtype=bool), parallel=True, n_threads=2)


def test_a_remote_evaluation_runs_while_the_local_models_evaluate() -> None:
    local_done = threading.Event()
    remote = FakeRemote(seed=1, wait_for=local_done)
    eng = engine_with(remote, Signalling(seed=2, done=local_done))
    assert eng.remote_roles == ("large_base",) and eng.local_roles == ("small_ft",)
    assert eng.schedule.roles() == ("small_ft",)  # no lane, no thread share for it
    rows = eng.evaluate(0, [5, 6, 7])
    assert remote.saw is True  # the local model evaluated while the request waited
    assert rows.shape == (2, 1, 48)
    assert eng.stats.traffic["large_base"].requests == 1
    eng.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_without_overlap_the_remote_answers_first(overlap: bool) -> None:
    """The remote evaluation waits (up to a limit) for the local model to start: with overlap
    the local model starts at once and the wait ends; without it, the local model cannot
    start until the remote has answered, so the wait runs out. (It used to only record
    whether the local model had finished, which it had not in either mode.)"""
    local_started = threading.Event()
    remote = FakeRemote(seed=1)
    local = Signalling(seed=2, done=threading.Event())
    eng = engine_with(remote, local)
    eng.remote.overlap = overlap
    order: list[str] = []
    remote_decode, local_decode = remote.decode, local.decode

    def remote_spy(parts, out=None):  # noqa: ANN001, ANN202
        saw = local_started.wait(timeout=10 if overlap else 0.5)
        order.append(f"remote answered, local {'started' if saw else 'not started'}")
        return remote_decode(parts, out)

    def local_spy(parts, out=None):  # noqa: ANN001, ANN202
        local_started.set()
        return local_decode(parts, out)

    remote.decode = remote_spy  # type: ignore[method-assign]
    local.decode = local_spy  # type: ignore[method-assign]
    eng.evaluate(0, [5, 6, 7])
    assert order == ["remote answered, local " + ("started" if overlap else "not started")]
    eng.close()


def test_remote_io_without_overlap_returns_answered_requests() -> None:
    """RemoteIO.start, the switch itself: with overlap its requests are still under way
    when it returns; without, every one has been answered."""
    from eft_local.remote.io import RemoteIO

    for overlap in (True, False):
        release = threading.Event()
        lanes = RemoteIO(1)
        lanes.overlap = overlap

        def answer(release: threading.Event = release, overlap: bool = overlap) -> np.ndarray:
            if overlap:
                release.wait(10)  # under way until the test releases it
            else:
                time.sleep(0.3)  # nothing could release it while start waits: slow instead
            return np.zeros(2)

        pending = lanes.start({"r": answer}, {"r": FakeRemote(seed=1)}, {})
        assert pending["r"].done() is not overlap
        release.set()
        assert lanes.finish(pending)["r"].shape == (2,)
        lanes.close()


def test_a_failed_local_lane_abandons_the_remote_request() -> None:
    release = threading.Event()
    remote = FakeRemote(seed=1, release=release)
    eng = engine_with(remote, Signalling(seed=2, done=threading.Event(), fail=True,
                                         after=remote.started))
    with pytest.raises(EftError, match="local model failed"):
        eng.evaluate(0, [5, 6, 7])
    assert remote.abandoned == 1
    release.set()
    eng.close()


def test_a_remote_request_not_started_yet_is_cancelled_not_sent() -> None:
    """A step given up before the role's I/O thread took its request: the request never
    goes out (nothing to abandon), and the thread stays for the next step."""
    from eft_local.remote.io import RemoteIO

    io, remote = RemoteIO(1), FakeRemote(seed=1)
    models = {"large_base": remote}
    busy, release = threading.Event(), threading.Event()

    def occupy() -> np.ndarray:
        busy.set()
        release.wait(timeout=10)
        return np.zeros(1)

    first = io.start({"large_base": occupy}, models, {})
    assert busy.wait(timeout=10)
    second = io.start({"large_base": lambda: remote.eval([5])}, models, {})
    io.abandon(second, models)
    release.set()
    assert first["large_base"].result(timeout=10).shape == (1,)
    assert second["large_base"].cancelled() and remote.abandoned == 0
    third = io.start({"large_base": lambda: remote.eval([5])}, models, {})
    assert third["large_base"].result(timeout=10).shape == (1, 48)
    assert remote.eval_calls == 1
    io.close()


def test_the_rows_of_several_sequences_are_asked_for_at_once() -> None:
    """Issue 23: a remote model holds a sequence per slot; a step's parts for several
    sequences go out as concurrent requests (each client keeps its own sequence)."""
    from eft_local.backend.sequences import Part
    from eft_local.remote.model import RemoteModel
    from eft_local.remote.vocab import RemoteInfo
    from eft_local.vocab import VocabInfo

    vocab = VocabInfo(path="x", vocab_type="bpe", n_tokens=4, bos=-1, eos=0, eot=-1,
                      eog=frozenset({0}), add_bos=False, add_eos=False,
                      texts=(b"<e>", b"a", b"b", b"c"), attrs=(8, 0, 0, 0),
                      pieces=(b"<e>", b"a", b"b", b"c"), text_kind="piece")
    info = RemoteInfo(api="eft-local", model=None, role=None, vocab=vocab, n_ctx=64)
    model = RemoteModel(remote_spec("large_base", "http://h:1", "x"), endpoint(), info,
                        n_seq=3)
    together = threading.Barrier(3, timeout=10)  # every request must be under way at once
    seen: list[tuple[list[int], list[int]]] = []

    class Waiting:
        def rows(self, done: list[int], new: list[int], all_rows: bool) -> np.ndarray:
            together.wait()
            seen.append((done, new))
            return np.full((len(new) if all_rows else 1, 4), float(new[-1]), np.float32)

    model._clients = [Waiting() for _ in range(3)]
    out = np.zeros((3, 4), np.float32)
    rows = model.decode([Part(0, 0, (1, 2)), Part(1, 0, (3,)), Part(2, 0, (2, 3), "all")],
                        out)
    assert [model.seq_tokens(s) for s in range(3)] == [[1, 2], [3], [2, 3]]
    assert out[0].tolist() == [2.0] * 4 and out[1].tolist() == [3.0] * 4
    assert rows[2].shape == (2, 4)
    model.decode([Part(1, 1, (1,)), Part(0, 2, (3,)), Part(2, 1, (1,))], out)
    assert sorted(seen[3:]) == [([1, 2], [3]), ([2], [1]), ([3], [1])]
    with pytest.raises(EftError, match="holds 3 sequence"):
        model.seq_tokens(3)
    model.close()


def test_a_late_answer_after_abandon_changes_nothing() -> None:
    """RemoteModel drops the result of an evaluation its caller gave up on."""
    from eft_local.remote.model import RemoteModel
    from eft_local.remote.vocab import RemoteInfo
    from eft_local.vocab import VocabInfo

    vocab = VocabInfo(path="x", vocab_type="bpe", n_tokens=4, bos=-1, eos=0, eot=-1,
                      eog=frozenset({0}), add_bos=False, add_eos=False,
                      texts=(b"<e>", b"a", b"b", b"c"), attrs=(8, 0, 0, 0),
                      pieces=(b"<e>", b"a", b"b", b"c"), text_kind="piece")
    info = RemoteInfo(api="eft-local", model=None, role=None, vocab=vocab, n_ctx=64)
    model = RemoteModel(remote_spec("large_base", "http://h:1", "x"), endpoint(), info)
    release = threading.Event()

    class Slow:
        def rows(self, done: list[int], new: list[int], all_rows: bool) -> np.ndarray:
            release.wait(timeout=10)
            return np.zeros((1, 4), np.float32)

    model._clients = [Slow()]
    model.tokens[:] = [1, 2]
    failures: list[BaseException] = []
    worker = threading.Thread(target=lambda: _capture(failures, model.eval, [3]))
    worker.start()
    model.abandon()
    model.rewind(1)
    release.set()
    worker.join()
    assert model.tokens == [1] and isinstance(failures[0], Abandoned)
    assert model.piece(0) == b"" and model.piece(0, special=True) == b"<e>"
    assert model.is_eog(0) and model.file_size() > 1 << 40  # never the drafter


def _capture(sink: list[BaseException], call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except BaseException as exc:  # noqa: BLE001
        sink.append(exc)


# -- explore on token ids (vocabularies that spell no text) -------------------------------------
def test_explore_compares_on_token_ids(family, tmp_path: Path) -> None:  # noqa: ANN001
    from tests.clihelp import assert_one_line_error, run

    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([(7 * i) % 200 + 5 for i in range(40)]))
    args = ["explore", "-m", f"large_base={family.large_base}",
            "-m", f"small_ft={family.small_ft}", "-m", f"small_base={family.small_base}",
            "--window", "16", "--decode-tokens", "2", "--threads", "1",
            "--cache-dir", str(tmp_path / "c"), "--json"]
    result = run([*args, "--token-ids", str(ids)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert 30 <= out["rows"][0]["positions"] <= 39  # the ids' positions, window by window
    bad = tmp_path / "bad.json"
    bad.write_text('["a", 1]')
    assert_one_line_error(run([*args, "--token-ids", str(bad)]), "JSON list of at least 2")


# -- what identifies an OpenAI engine's tokenizer ------------------------------------------------
def test_the_vocabulary_cache_key_ignores_what_changes_between_calls() -> None:
    """vLLM's model card has a new ``created`` and permission id on every call."""
    from eft_local.remote.vocab import tokenizer_fingerprint

    def card(created: int, perm: str, root: str = "/models/fam") -> dict:
        return {"id": "fam", "object": "model", "created": created, "owned_by": "vllm",
                "root": root, "parent": None, "max_model_len": 256,
                "permission": [{"id": perm, "created": created}]}

    probe = [[5, 6], ["a", "b"], [5, 6]]
    same = tokenizer_fingerprint(card(1, "modelperm-1"), None, 1024, probe)
    assert tokenizer_fingerprint(card(2, "modelperm-2"), None, 1024, probe) == same
    assert tokenizer_fingerprint(card(1, "modelperm-1", "/models/other"), None, 1024,
                                 probe) != same
    assert tokenizer_fingerprint(card(1, "modelperm-1"), None, 1024,
                                 [[5, 7], ["a", "c"], [5, 7]]) != same


@pytest.mark.parametrize(("probe", "bos"), [
    ([[1, 5, 6], None, [5, 6]], 1),  # a BOS comes only with special tokens
    ([[5, 6], None, [5, 6]], -1),  # none added
    ([None, None, None], -1),  # no /tokenize
    ([[9999, 5], None, [5]], -1),  # outside the vocabulary
])
def test_the_bos_an_openai_engine_adds(probe: list, bos: int) -> None:
    from eft_local.remote.vocab import _bos

    assert _bos(probe, 1024) == bos
