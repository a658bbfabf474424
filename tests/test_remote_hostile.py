"""Remote engines that misbehave (issue 22's third round, issues 25 and 26): one that drips its
answer, one whose chunked body never ends, one that claims 20 GB or a 100-million-token
vocabulary, one that answers 504; keys in URLs and messages; the I/O threads after an
abandoned step. Fake engines are in-process loopback servers that write raw HTTP, so they
can do what no real server would."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from eft_local import sampler
from eft_local.engine import Engine
from eft_local.errors import EftError
from eft_local.presets import (
    ModelSpec,
    hide_keys,
    preset_from_paths,
    public_url,
    remote_spec,
)
from eft_local.remote import http as remote_http
from eft_local.remote.exact import ExactClient, encode_rows
from eft_local.remote.http import Endpoint, RemoteError
from eft_local.remote.model import RemoteModel, endpoint_for
from eft_local.remote.topk import check_entries, topk_row
from eft_local.remote.vocab import RemoteInfo, read_info
from eft_local.vocab import VocabInfo
from tests.fakes import FakeModel
from tests.remotehelp import Answer, RawServer, respond


@contextmanager
def engine_at(answer: Answer) -> Iterator[RawServer]:
    with RawServer(answer) as server:
        yield server


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_http, "BACKOFF_SECONDS", 0.01)


def in_thread(call: Callable[[], object], limit: float = 20.0) -> BaseException | object:
    """``call()`` in a thread; what it returned or raised. A call still running after
    ``limit`` seconds fails the test (rather than hanging it)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001
            box["value"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still running after {limit} s"
    return box["value"]


# -- one deadline per request --------------------------------------------------------------------
def drip_body(path: str, body: bytes, sock: socket.socket) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n")
    for _ in range(4096):
        sock.sendall(b"x")
        time.sleep(0.05)
    return True


def drip_head(path: str, body: bytes, sock: socket.socket) -> bool:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}":
        sock.sendall(bytes([byte]))
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("answer", [drip_body, drip_head], ids=["body", "headers"])
def test_an_engine_that_drips_its_answer_ends_at_the_deadline(answer: Answer) -> None:
    """The timeout bounds the whole request, not each read: a byte every 50 ms used to
    keep a 0.5 s timeout from ever tripping."""
    with engine_at(answer) as server:
        got = in_thread(lambda: Endpoint(server.url, role="large_base", timeout=0.5)
                        .request("GET", "/slow"))
    assert isinstance(got, RemoteError) and got.status == 504
    assert "no answer within 0.5 s" in str(got) and len(server.paths) == 1


def test_a_504_is_not_asked_again() -> None:
    """504 is a timeout (a gateway's): waiting for it twice would break the promise."""
    with engine_at(lambda p, b, s: respond(s, 504, {"error": "gateway timeout"})) as server, \
            pytest.raises(RemoteError) as err:
        Endpoint(server.url, role="large_base").json("GET", "/x")
    assert err.value.status == 504 and "HTTP 504" in str(err.value)
    assert server.paths == ["/x"]


# -- size caps ------------------------------------------------------------------------------------
def exact_client(url: str, width: int = 8) -> ExactClient:
    return ExactClient(Endpoint(url + "#timeout=20", role="large_base"), role=None,
                       model=None, width=width)


def test_a_huge_content_length_is_refused_before_reading() -> None:
    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Eft-Rows: 1\r\nX-Eft-Width: 8\r\n"
                     b"Content-Length: 20000000000\r\n\r\n" + b"\0" * 32)
        return True

    with engine_at(answer) as server:
        got = in_thread(lambda: exact_client(server.url).rows([1], [2], all_rows=False))
    assert isinstance(got, RemoteError), got
    assert "answered 20000000000 bytes (Content-Length), more than the" in str(got)


def test_an_endless_chunked_body_is_cut_at_the_cap() -> None:
    """A chunked body has no length to check first: it is cut where it passes the cap
    (here 4 x 1 x 8 bytes of rows plus the headroom), not read to the end."""
    sent = {"bytes": 0}
    chunk = b"\0" * 65536
    cap = 64 << 20  # the fake stops here: the old client read all of it

    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Eft-Rows: 1\r\nX-Eft-Width: 8\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent["bytes"] < cap:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent["bytes"] += len(chunk)
        sock.sendall(b"0\r\n\r\n")
        return True

    with engine_at(answer) as server:
        got = in_thread(lambda: exact_client(server.url).rows([1], [2], all_rows=False))
    assert isinstance(got, RemoteError), got
    assert sent["bytes"] < cap and "answered more than the" in str(got)
    assert f"the {4 * 8 + remote_http.ANSWER_HEADROOM} bytes its answer can hold" in str(got)


# -- vocabulary sizes ---------------------------------------------------------------------------
def vocab_engine(api: str, n: int) -> Answer:
    """An engine of ``api`` that claims ``n`` tokens and answers 500 to reading them."""
    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        if path.startswith("/eft/vocab"):
            if api != "eft-local":
                return respond(sock, 404, {})
            if "hash_only" in path:
                return respond(sock, 200, {"hash": "h", "n_tokens": n, "n_ctx": 64})
        if path == "/props":
            return respond(sock, 200, {"build_info": "b"} if api == "llama-server" else {})
        if path == "/v1/models":
            return respond(sock, 200, {"data": [{"id": "m", "meta": {"n_vocab": n, "n_ctx": 64}}]})
        if path == "/v1/completions":
            return respond(sock, 200, {"choices": [{"logprobs": {"top_logprobs": [{"a": -1}]}}]})
        if path == "/tokenizer_info":
            return respond(sock, 200, {"vocab_size": n})
        return respond(sock, 500, {"error": "no"})
    return answer


READS = {"eft-local": "/eft/vocab?", "llama-server": "/tokenize", "openai": "/detokenize"}


@pytest.mark.parametrize("api", list(READS))
@pytest.mark.parametrize(("n", "expected", "words"), [
    (100_000_000, None, "claims a vocabulary of 100000000 tokens, outside [1, 1048576]"),
    (5000, 1024, "claims a vocabulary of 5000 tokens, more than 2 times the local models' "
                 "1024"),
])
def test_a_vocabulary_size_is_checked_before_it_is_read(api: str, n: int, expected: int | None,
                                                        words: str) -> None:
    with engine_at(vocab_engine(api, n)) as server:
        spec = remote_spec("large_base", f"{server.url}#api={api}", "x")
        got = in_thread(lambda: read_info(endpoint_for(spec), spec, expected=expected))
    assert isinstance(got, RemoteError), got
    assert words in str(got) and "nothing was read" in str(got)
    assert not [p for p in server.paths if p.startswith(READS[api]) and "hash_only" not in p]


def test_the_pool_holds_a_connection_per_reading_thread(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """Eight threads spell an OpenAI engine's vocabulary: a pool of four used to discard
    connections (and log it) on nearly every request."""
    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        if path == "/detokenize":
            time.sleep(0.005)
            return respond(sock, 200, {"prompt": chr(97 + json.loads(body)["tokens"][0] % 26)})
        return vocab_engine("openai", 96)(path, body, sock)

    with caplog.at_level(logging.WARNING, logger="urllib3"), engine_at(answer) as server:
        spec = remote_spec("large_base", f"{server.url}#api=openai", "x")
        info = read_info(endpoint_for(spec), spec, expected=96)
    assert info.vocab.n_tokens == 96 and info.vocab.pieces[27] == b"b"
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
    assert server.connections <= 9  # one per thread (and the first requests')


# -- keys -----------------------------------------------------------------------------------------
KEY = "sk-proj-4fQ9x2LmT7vB8nW3kZ"


@pytest.mark.parametrize("pair", [f"large_base=http://gpu:8080#key={KEY}",
                                  f"large_base=http://gpu:8080#{KEY}=1",
                                  f"large_base=http://gpu:8080#top_k={KEY}",
                                  f"large base=http://gpu:8080#key={KEY}"])
def test_a_key_in_a_url_is_never_echoed(pair: str) -> None:
    with pytest.raises(EftError) as err:
        preset_from_paths([pair])
    assert "sk-proj" not in str(err.value) and "4fQ9" not in str(err.value)
    if "#key=" in pair and "large_base" in pair:
        assert "not the key itself" in str(err.value)


def test_an_engine_that_echoes_the_key_has_it_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_KEY", "Zq81xVb27LmN44pQrs90TTuv")
    message = {"error": {"message": "Incorrect API key provided: Zq81xVb27LmN44pQrs90TTuv "
                                    f"(also not {KEY})"}}
    with engine_at(lambda p, b, s: respond(s, 401, message)) as server, \
            pytest.raises(RemoteError) as err:
        Endpoint(server.url, role="large_base", api_key_env="GPU_KEY").json("GET", "/x")
    text = str(err.value)
    assert "HTTP 401" in text and "Incorrect API key provided: [hidden]" in text
    assert "Zq81" not in text and "sk-proj" not in text


def test_what_looks_like_a_key() -> None:
    plain = "OPENAI_API_KEY hf_token_name Qwen2.5-72B-Instruct-AWQ /v1/completions sk-learn"
    assert hide_keys(plain) == plain
    for key in (KEY, "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789", "AKIAIOSFODNN7EXAMPLE",
                "0f8fad5b-d9cb-469f-a165-70867728950e", "Zq81xVb27LmN44pQrs90TTuv"):
        assert hide_keys(f"key {key}.") == "key [hidden]."


def test_a_url_shows_no_key_anywhere() -> None:
    assert public_url(f"https://h:8/v1/{KEY}/x?key=abc") == "https://h:8/v1/[hidden]/x"
    spec = ModelSpec(role="r", url=f"http://h:1/{KEY}", model="m")
    assert "sk-proj" not in spec.describe()


def test_an_unclosed_ipv6_address_is_a_one_line_error() -> None:
    with pytest.raises(EftError) as err:
        preset_from_paths(["large_base=http://[::1:18710", "small_ft=a.gguf"])
    assert "'http://[::1:18710' is not a valid URL" in str(err.value)
    assert "\n" not in str(err.value)


# -- rows that would break the mix ----------------------------------------------------------------
def test_minus_infinity_from_the_exact_protocol_is_the_engine_s_fault() -> None:
    """Under the down formula large_base weighs -beta: -inf would turn +inf, and the
    error would blame beta."""
    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        rows = np.zeros((1, 8), np.float32)
        rows[0, 3] = -np.inf
        return respond(sock, 200, encode_rows(rows), {"X-Eft-Rows": "1", "X-Eft-Width": "8"})

    with engine_at(answer) as server, pytest.raises(RemoteError) as err:
        exact_client(server.url).rows([1], [2], all_rows=False)
    assert str(err.value).startswith(f"remote large_base ({server.url}): ")
    assert "NaN or infinite" in str(err.value)


PLACEHOLDERS = {"-inf": -math.inf, "vllm": -9999.0, "llama-server": -3.4028235e38}


@pytest.mark.parametrize("placeholder", list(PLACEHOLDERS.values()), ids=list(PLACEHOLDERS))
@pytest.mark.parametrize("where", [0, 1, 3], ids=["first", "middle", "last"])
def test_a_placeholder_log_prob_is_a_tail_token_and_never_drawn(placeholder: float,
                                                                where: int) -> None:
    """Engines write probability 0 as -inf, -9999.0 (vLLM) or -FLT_MAX (llama-server).
    Under a negative weight the old floor (-76) became +76: the placeholder was the draw;
    -FLT_MAX overflowed. Now it is "not in the row", wherever the answer lists it (vLLM
    puts the position's own token first)."""
    width, banned = 8, 5
    lps = [math.log(0.6), math.log(0.25), math.log(0.1), math.log(0.05)]
    ids = [0, 1, 2, 3]
    ids.insert(where, banned)
    lps.insert(where, placeholder)
    row = topk_row(ids, lps, width, top_k=4)
    assert np.isfinite(row).all()
    assert row[banned] == row[6] == row[7] <= row[3]  # a tail token like the others
    # the small pair agree with large_base: ids 0..3 likely, the rest about e^-20
    small = np.log(np.array([0.5, 0.3, 0.1, 0.1, *[2e-9] * 4], dtype=np.float32))
    # down-scaling: small_base + beta * (large_ft - large_base), large_base top-K
    mix = sampler.mix_logits(np.stack([small, small, row]),
                             np.array([1.0, 2.0, -2.0], np.float32), np.ones(width, bool))
    assert np.isfinite(mix).all() and int(np.argmax(mix)) in (0, 1, 2, 3)
    assert mix[banned] < -10


def test_an_answer_of_placeholders_only_is_refused() -> None:
    ep = Endpoint("http://127.0.0.1:9", role="large_base")
    with pytest.raises(RemoteError) as err:
        check_entries(ep, [0, 1], [-9999.0, -math.inf], width=8, top_k=2,
                      where="at position 4")
    assert "only placeholder log-probs" in str(err.value) and "at position 4" in str(err.value)


def test_top_k_probabilities_summing_past_one_are_refused() -> None:
    ep = Endpoint("http://127.0.0.1:9", role="large_base")
    with pytest.raises(RemoteError) as err:
        check_entries(ep, list(range(20)), [0.0] * 20, width=30, top_k=20,
                      where="at position 4")
    assert "probabilities sum to 20 at position 4" in str(err.value)
    check_entries(ep, [1, 2], [math.log(0.6), math.log(0.4004)], width=10, top_k=2,
                  where="at position 4")  # rounding is allowed


# -- the I/O threads after an abandoned step ------------------------------------------------------
def exact_model(url: str, timeout: float) -> RemoteModel:
    pieces = tuple(bytes([97 + i % 26]) for i in range(48))
    vocab = VocabInfo(path="x", vocab_type="bpe", n_tokens=48, bos=-1, eos=1, eot=-1,
                      eog=frozenset({1}), add_bos=False, add_eos=False, texts=pieces,
                      attrs=(0,) * 48, pieces=pieces, text_kind="piece")
    info = RemoteInfo(api="eft-local", model=None, role=None, vocab=vocab, n_ctx=256)
    spec = remote_spec("large_base", f"{url}#timeout={timeout:g}", "x")
    return RemoteModel(spec, endpoint_for(spec), info)


class Interrupted(FakeModel):
    """A local model whose first evaluation is interrupted (Ctrl-C) once ``sent`` is set."""

    def __init__(self, sent: threading.Event, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.sent = sent
        self.interrupt = True

    def decode(self, parts, out=None):  # noqa: ANN001, ANN201 - FakeModel.decode's
        if self.interrupt:
            self.interrupt = False
            assert self.sent.wait(10)
            raise KeyboardInterrupt
        return super().decode(parts, out)


def test_after_ctrl_c_the_next_step_does_not_wait_for_the_abandoned_request() -> None:
    """The first request stalls (no answer; a 60 s timeout): Ctrl-C abandons it, its
    connection is closed, and the next step's request goes out and is answered at once,
    not after the stalled one's timeout."""
    sent = threading.Event()

    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        if len(server.paths) == 1:
            sent.set()
            server.wait_hung_up(sock)
            return False
        rows = np.zeros((1, 48), np.float32)
        return respond(sock, 200, encode_rows(rows), {"X-Eft-Rows": "1", "X-Eft-Width": "48"})

    with engine_at(answer) as server:
        remote = exact_model(server.url, timeout=60)
        eng = Engine({"large_base": remote, "small_ft": Interrupted(sent, seed=2)},
                     template_role="small_ft", allowed=np.ones(48, dtype=bool), parallel=True,
                     n_threads=2)
        with pytest.raises(KeyboardInterrupt):
            eng.evaluate(0, [5, 6, 7])
        assert server.hung_up.wait(10)  # the abandoned request's connection was closed
        rows = in_thread(lambda: eng.evaluate(0, [5, 6, 7]), limit=20)
        assert isinstance(rows, np.ndarray) and rows.shape == (2, 1, 48), rows
        assert remote.tokens == [5, 6, 7] and len(server.paths) == 2
        eng.close()
