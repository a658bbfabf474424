"""Remote roles against real second processes on loopback (issue 15's proof).

One ``eft-local serve tiny-large-base`` per module serves the bundled large base; the small
pair stays local. (a) over the exact protocol, greedy and seeded temperature-1 generation,
speculative decoding, chat and scoring equal the all-local run token for token; (b) the
OpenAI protocol's top-K rows, exact where K covers the vocabulary, with their KL and top-1
agreement from ``explore``; (c) third-party engines: llama-cpp-python's server (which takes
no token-id prompts: refused in one line) and llama.cpp's llama-server (where its binary is
present); (d) faults: a remote killed mid-generation, one that stalls past the timeout, one
with another vocabulary; each test checks what was kept.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from eft_local.errors import EftError
from eft_local.presets import FAMILY_DIR
from eft_local.remote import http as remote_http
from eft_local.session import LoadOptions, Session, load_session
from tests import remotehelp
from tests.clihelp import THREADS, assert_one_line_error, run
from tests.remotehelp import RawServer, Remote, respond

LOCAL = [f"small_ft={FAMILY_DIR / 'small_ft.gguf'}", f"small_base={FAMILY_DIR / 'small_base.gguf'}"]
LARGE = FAMILY_DIR / "large_base.gguf"
PROMPT = "Has Zhithdou was born in"
TOLERANCE = 1e-4


def trio(large: str | Path, **options: object) -> Session:
    """Up-scaling with ``large`` (a file or URL) as the large base, the small pair local."""
    return load_session(models=[f"large_base={large}", *LOCAL],
                        options=LoadOptions(n_threads=1, **options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """``eft-local serve tiny-large-base`` in a child process, for the whole module."""
    remote = remotehelp.eft_serve(["tiny-large-base", "--max-logprobs", "1024"],
                                  tmp_path_factory.mktemp("served"))
    remote.start()
    yield remote
    remote.stop()


@pytest.fixture(scope="module")
def local() -> Iterator[Session]:
    with trio(LARGE, speculative=False) as session:
        yield session


@pytest.fixture()
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries after 10 ms, not a quarter of a second."""
    monkeypatch.setattr(remote_http, "BACKOFF_SECONDS", 0.01)


def same_steps(a, b) -> None:  # noqa: ANN001
    """Token for token, log-probs within TOLERANCE."""
    assert [s.token for s in a.steps] == [s.token for s in b.steps]
    diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.steps, b.steps, strict=True)]
    assert max(diffs) <= TOLERANCE, max(diffs)


# -- (a) the exact protocol ----------------------------------------------------------------------
@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (1.0, 3), (1.0, 11)])
def test_exact_generation_equals_local(served: Remote, local: Session, temperature: float,
                                       seed: int) -> None:
    with trio(served.url, speculative=False) as remote:
        assert remote.engine.remote_roles == ("large_base",)
        want = local.generate(PROMPT, max_tokens=40, temperature=temperature, seed=seed,
                              top_n=0)
        got = remote.generate(PROMPT, max_tokens=40, temperature=temperature, seed=seed,
                              top_n=0)
        same_steps(got, want)
        assert got.text == want.text
        net = remote.stats()["remote"]["large_base"]
        assert net["requests"] == len(got.steps)  # the prompt, then one per token
        assert net["received"] == 4 * 1024 * len(got.steps)  # float32 rows, one each


def test_exact_speculative_verifies_a_block_in_one_request(served: Remote,
                                                           local: Session) -> None:
    want = local.generate(PROMPT, max_tokens=40, temperature=1.0, seed=5, top_n=0)
    with trio(served.url, draft_k=4) as remote:
        got = remote.generate(PROMPT, max_tokens=40, temperature=1.0, seed=5, top_n=0)
        stats = remote.stats()
    same_steps(got, want)
    assert stats["drafted_tokens"] > 0 and stats["accepted_tokens"] > 0
    assert stats["remote"]["large_base"]["tokens_per_request"] > 1.5


def test_exact_score_and_chat_equal_local(served: Remote, local: Session) -> None:
    text = (FAMILY_DIR / "heldout.txt").read_text()[:600]
    with trio(served.url, speculative=False) as remote:
        want, got = local.score(text, top_n=2), remote.score(text, top_n=2)
        assert [t.token for t in got.tokens] == [t.token for t in want.tokens]
        assert max(abs(x.logprob - y.logprob) for x, y in
                   zip(got.tokens[1:], want.tokens[1:], strict=True)) <= TOLERANCE
        local.reset()
        for question in ("What is the home town of Has Zhithdou?", "And when was he born?"):
            mine = "".join(c.text for c in remote.chat(question, max_tokens=30, temperature=0))
            theirs = "".join(c.text for c in local.chat(question, max_tokens=30,
                                                        temperature=0))
            assert mine == theirs
        local.reset()
        net = remote.stats()["remote"]["large_base"]
        assert net["resent"] == 0


def test_another_client_in_between_makes_the_prefix_resend(served: Remote,
                                                          local: Session) -> None:
    """The engine's cache no longer holds this client's prefix (another client, or a
    restart): 409, and the whole sequence goes again; the output does not change."""
    want = [local.generate(PROMPT + extra, max_tokens=12, temperature=0).text
            for extra in ("", " the")]
    with trio(served.url, speculative=False) as first, \
            trio(served.url, speculative=False) as second:
        assert first.generate(PROMPT, max_tokens=12, temperature=0).text == want[0]
        second.generate("Tova Brint", max_tokens=8, temperature=0)  # the cache moves on
        assert first.generate(PROMPT + " the", max_tokens=12, temperature=0).text == want[1]
        assert first.stats()["remote"]["large_base"]["resent"] == 1


def test_cli_generate_json_and_check_take_a_url(served: Remote) -> None:
    models = ["-m", f"large_base={served.url}", "-m", LOCAL[0], "-m", LOCAL[1]]
    local_out = run(["generate", "-m", f"large_base={LARGE}", *models[2:], "--raw", "-t", "0",
                     "--max-tokens", "16", "--json", PROMPT, *THREADS])
    result = run(["generate", *models, "--raw", "-t", "0", "--max-tokens", "16", "--json",
                  PROMPT, *THREADS])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["text"] == json.loads(local_out.stdout)["text"]
    net = record["remote"]["large_base"]
    assert net["bytes_per_token"] > 4 * 1024 and net["ms_per_token"] > 0
    checked = run(["check", served.url])
    assert checked.exit_code == 0, checked.output
    assert "verdict: aligned" in checked.stdout and served.url in checked.stdout
    checked = run(["check", *models, "--json"])
    assert json.loads(checked.stdout)["verdict"] == "aligned"


# -- (b) OpenAI-compatible completions, top K ---------------------------------------------------
def test_openai_protocol_with_k_covering_the_vocabulary_is_exact(served: Remote,
                                                                  local: Session) -> None:
    with trio(f"{served.url}#api=openai&top_k=1024", draft_k=3) as remote:
        assert remote.models["large_base"].describe().endswith("(openai, top 1024 log-probs)")
        want = local.generate(PROMPT, max_tokens=24, temperature=0, top_n=0)
        got = remote.generate(PROMPT, max_tokens=24, temperature=0, top_n=0)
        assert [s.token for s in got.steps] == [s.token for s in want.steps]
        assert max(abs(x.logprob - y.logprob)
                   for x, y in zip(got.steps, want.steps, strict=True)) <= 1e-3


def test_openai_top_k_kl_and_agreement_from_explore(served: Remote, tmp_path: Path) -> None:
    """A remote role is one more alternative for explore: top 20 costs KL, top 1024 (the
    whole vocabulary) none."""
    from eft_local.explore.candidates import candidates_for, combinations, largest
    from eft_local.explore.explorer import Explorer
    from eft_local.explore.explorer import Settings as ExploreSettings

    urls = [f"{served.url}#api=openai&top_k={k}" for k in (20, 1024)]
    template, candidates = candidates_for(
        None, [f"large_base={LARGE}", *(f"large_base={u}" for u in urls), *LOCAL], [])
    reference = largest(candidates)
    assert reference.files["large_base"] == LARGE
    text = (FAMILY_DIR / "heldout.txt").read_text()[:1500]
    explorer = Explorer(template, reference, ExploreSettings(
        text=text, window=128, decode_tokens=2, prompts=1, prompt_tokens=8),
        options=LoadOptions(n_threads=1), cache_dir=tmp_path)
    combos = combinations(candidates, first=reference)
    explorer.prepare(combos)
    rows = {row.label: row for row in map(explorer.run, combos)}
    k20, k1024 = rows["remote api=openai top_k=20"], rows["remote api=openai top_k=1024"]
    assert k1024.quality.kl_mean < 1e-5 and k1024.quality.top1_agreement == 1.0
    assert k20.quality.kl_mean > 100 * k1024.quality.kl_mean
    assert 0.9 < k20.quality.top1_agreement <= 1.0


# -- (c) third-party engines ---------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None
                    or importlib.util.find_spec("sse_starlette") is None,
                    reason="llama-cpp-python's server is not installed "
                    "(pip install 'llama-cpp-python[server]')")
def test_llama_cpp_python_server_takes_no_token_prompts(tmp_path: Path) -> None:
    """It answers log-probs for text prompts only: the remote role is refused in one line
    before anything loads (conditioning on re-tokenized text is not the same tokens)."""
    remote = remotehelp.llama_cpp_python_server(LARGE, tmp_path).start()
    try:
        text = httpx.post(remote.url + "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 1, "logprobs": 3, "temperature": 0}).json()
        assert len(text["choices"][0]["logprobs"]["top_logprobs"][0]) >= 3
        with pytest.raises(EftError) as err:
            trio(f"{remote.url}#api=openai&top_k=20")
        message = str(err.value)
        assert "\n" not in message and "large_base" in message and remote.url in message
        assert "token-id prompt" in message
    finally:
        remote.stop()


@pytest.mark.skipif(remotehelp.llama_server_binary() is None,
                    reason="llama.cpp's llama-server is not built (.ci/llama-server builds it "
                    "into ~/.cache/eft-local-llama-server; or set EFT_LOCAL_LLAMA_SERVER)")
@pytest.mark.parametrize("rpc", [False, True], ids=["alone", "layers-on-rpc-server"])
def test_llama_server_with_k_covering_the_vocabulary_is_exact(local: Session, tmp_path: Path,
                                                              rpc: bool) -> None:
    """llama-server's /completion with n_probs = the vocabulary; with --rpc every layer
    runs in a ggml-rpc-server (llama.cpp's way to span machines), the rows are the same."""
    binary = remotehelp.llama_server_binary()
    assert binary is not None
    helper = None
    if rpc:
        rpc_binary = remotehelp.rpc_server_binary()
        if rpc_binary is None:
            pytest.skip("ggml-rpc-server is not built beside llama-server (.ci/llama-server "
                        "builds both)")
        helper, address = remotehelp.rpc_server(rpc_binary, tmp_path)
    remote = remotehelp.llama_server(binary, LARGE, tmp_path,
                                     rpc=address if rpc else None).start()
    try:
        if rpc:
            assert "offloaded 7/7 layers" in remote.log.read_text()
        checked = run(["check", remote.url])
        assert checked.exit_code == 0 and "verdict: aligned" in checked.stdout, checked.output
        with trio(f"{remote.url}#top_k=1024", speculative=False) as session:
            assert session.models["large_base"].api == "llama-server"
            for temperature, seed in ((0.0, 0), (1.0, 3)):
                same_steps(session.generate(PROMPT, max_tokens=24, temperature=temperature,
                                            seed=seed, top_n=0),
                           local.generate(PROMPT, max_tokens=24, temperature=temperature,
                                          seed=seed, top_n=0))
            text = (FAMILY_DIR / "heldout.txt").read_text()[:200]
            got, want = session.score(text), local.score(text)
            assert max(abs(x.logprob - y.logprob) for x, y in
                       zip(got.tokens[1:], want.tokens[1:], strict=True)) <= TOLERANCE
    finally:
        remote.stop()
        if helper is not None:
            helper.kill()
            helper.wait(timeout=10)


# -- (d) faults ----------------------------------------------------------------------------------
@pytest.fixture()
def victim(tmp_path: Path) -> Iterator[Remote]:
    """A server of its own, for a test to kill or stall."""
    remote = remotehelp.eft_serve(["tiny-large-base"], tmp_path / "victim").start()
    yield remote
    remote.resume() if remote.proc and remote.proc.poll() is None else None
    remote.stop()


def restart(remote: Remote) -> Remote:
    """The same server again, on the same port, with an empty cache."""
    again = Remote(argv=remote.argv, port=remote.port, env=remote.env, log=remote.log)
    return again.start()


def test_top_k_above_the_engine_s_limit_is_refused_at_start(victim: Remote) -> None:
    """eft-local serve answers at most --max-logprobs (20 by default) log-probs: top_k 100
    used to load, then fail at the first step; now it is refused before anything mixes,
    with the engine's own words (vLLM's limit: tests/test_remote_vllm.py)."""
    with pytest.raises(EftError) as err:
        trio(f"{victim.url}#api=openai&top_k=100")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"remote large_base ({victim.url})")
    assert "refused top_k 100 log-probs (HTTP 400:" in message and "--max-logprobs" in message


def test_remote_killed_mid_generation_keeps_the_conversation(victim: Remote, local: Session,
                                                            quick_retries: None) -> None:
    with trio(victim.url, speculative=False) as session:
        first = "".join(c.text for c in session.chat("What is the home town of Has Zhithdou?",
                                                     max_tokens=20, temperature=0))
        kept = list(session.conversation.turns)
        stream = session.chat("And when was he born?", max_tokens=30, temperature=0)
        next(stream)
        next(stream)
        victim.kill()
        with pytest.raises(EftError) as err:
            list(stream)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"remote large_base ({victim.url})")
        assert "connection refused" in message
        assert session.conversation.turns == kept  # the failed turn left nothing behind
        again = restart(victim)
        try:
            reply = "".join(c.text for c in session.chat("And when was he born?",
                                                         max_tokens=30, temperature=0))
            # the restarted engine's cache was empty: the prefix went again, once
            assert session.stats()["remote"]["large_base"]["resent"] == 1
        finally:
            again.stop()
    local.reset()
    assert first == "".join(c.text for c in local.chat(
        "What is the home town of Has Zhithdou?", max_tokens=20, temperature=0))
    assert reply == "".join(c.text for c in local.chat("And when was he born?",
                                                        max_tokens=30, temperature=0))
    local.reset()


def test_a_batch_keeps_its_records_when_the_remote_dies(victim: Remote, tmp_path: Path,
                                                         quick_retries: None) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"{name} was born in",
                                           "raw": True}) + "\n"
                               for i, name in enumerate(["Has Zhithdou", "Tova Brint",
                                                         "Has Zhithdou is", "Tova",
                                                         "Has", "Zhithdou"])))
    out = tmp_path / "out.jsonl"
    args = ["generate", "-m", f"large_base={victim.url}", "-m", LOCAL[0], "-m", LOCAL[1],
            "--input", str(prompts), "--output", str(out), "-t", "0", "--max-tokens", "48",
            "--no-speculative", *THREADS]

    def kill_after_the_first_record() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 1:
                victim.kill()
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_the_first_record)
    watcher.start()
    result = run(args)
    watcher.join()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6, result.output
    errors = [r for r in records if "error" in r]
    done = [r for r in records if "text" in r]
    assert done and errors and records.index(errors[0]) >= len(done)
    assert all(f"remote large_base ({victim.url})" in r["error"] for r in errors)
    again = restart(victim)
    try:
        rerun = run(args)
    finally:
        again.stop()
    assert rerun.exit_code == 0, rerun.output
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert final[:6] == records  # nothing written before was touched
    assert sorted(r["id"] for r in final[6:]) == sorted(r["id"] for r in errors)
    assert all("text" in r for r in final[6:])


def test_a_stalled_remote_times_out_and_the_session_goes_on(victim: Remote) -> None:
    with trio(f"{victim.url}#timeout=1", speculative=False) as session:
        before = session.generate(PROMPT, max_tokens=10, temperature=0).text
        victim.pause()
        try:
            started = time.monotonic()
            with pytest.raises(EftError) as err:
                session.generate("Tova Brint was born in", max_tokens=10, temperature=0)
            waited = time.monotonic() - started
        finally:
            victim.resume()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"remote large_base ({victim.url})")
        assert "no answer within 1 s" in message and getattr(err.value, "status", 0) == 504
        assert waited < 30
        assert session.generate(PROMPT, max_tokens=10, temperature=0).text == before


def dripping_rows(served: Remote) -> RawServer:
    """An engine that describes the served vocabulary (asking ``served``) and then drips
    its rows a byte every 0.2 s; ``rows`` is set when a rows request came."""
    def answer(path: str, body: bytes, sock: socket.socket) -> bool:
        if path.startswith("/eft/vocab"):
            try:
                with urllib.request.urlopen(served.url + path, timeout=30) as resp:
                    return respond(sock, resp.status, resp.read())
            except urllib.error.HTTPError as exc:
                return respond(sock, exc.code, exc.read())
        server.rows.set()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not server.stop.wait(0.2):
            sock.sendall(b"\0")
        return False

    server = RawServer(answer)
    server.rows = threading.Event()  # type: ignore[attr-defined]
    return server


@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                      (signal.SIGINT, 130, "interrupted")])
def test_a_signal_during_a_stuck_read_ends_the_command(served: Remote, tmp_path: Path,
                                                      signum: int, code: int, word: str) -> None:
    """The engine drips its rows (its 120 s timeout is far off): SIGTERM or Ctrl-C ends
    ``eft-local generate`` at once with 143 or 130; it used to print ``error: terminated``
    and live on until the stuck read in its I/O thread ended."""
    with dripping_rows(served) as engine:
        argv = [sys.executable, "-m", "eft_local", "generate", "-m",
                f"large_base={engine.url}#api=eft-local&timeout=120", *[
                    x for pair in LOCAL for x in ("-m", pair)], "--raw", "-t", "0",
                "--max-tokens", "4", PROMPT, *THREADS]
        proc = subprocess.Popen(argv, env=remotehelp.child_env(tmp_path), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert engine.rows.wait(60), proc.stderr.read().decode() if proc.poll() else ""
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err.decode()
    assert err.decode().rstrip("\n").splitlines()[-1] == f"error: {word}"


def test_a_server_request_with_a_stalled_remote_fails_alone(victim: Remote) -> None:
    from tests.servehelp import serving

    pairs = [f"large_base={victim.url}#timeout=1", *LOCAL]
    with serving(models=pairs) as server:
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        first = httpx.post(server.v1 + "/completions", json=body, timeout=60)
        assert first.status_code == 200
        victim.pause()
        try:
            failed = httpx.post(server.v1 + "/completions", json=body, timeout=60)
        finally:
            victim.resume()
        assert failed.status_code == 504
        error = failed.json()["error"]
        assert error["code"] == "remote_failed" and victim.url in error["message"]
        again = httpx.post(server.v1 + "/completions", json=body, timeout=60)
        assert again.status_code == 200
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


def test_a_remote_with_another_vocabulary_is_refused_before_anything_mixes(
        family, tmp_path: Path) -> None:  # noqa: ANN001
    other = remotehelp.eft_serve(["-m", f"large_base={family.mismatched}"],
                                 tmp_path / "other").start()
    try:
        pairs = [f"large_base={other.url}", f"small_ft={family.small_ft}",
                 f"small_base={family.small_base}"]
        with pytest.raises(EftError) as err:
            load_session(models=pairs, options=LoadOptions(n_threads=1))
        assert "do not share a token space" in str(err.value)
        assert "normal tokens differ" in str(err.value)
        result = run(["check", *(x for p in pairs for x in ("-m", p))])
        assert result.exit_code == 1 and "verdict: incompatible" in result.stdout
        result = run(["generate", *(x for p in pairs for x in ("-m", p)), "--raw", "hello",
                      *THREADS])
        assert_one_line_error(result, "do not share a token space")
        assert result.stdout == ""
    finally:
        other.stop()


def test_rows_are_float32_little_endian_with_their_shape(served: Remote) -> None:
    """The wire format, read by hand: a header-sized shape and 4 bytes per logit."""
    answer = httpx.post(served.url + "/eft/rows", json={"tokens": [5, 6, 7], "first": 1})
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/octet-stream"
    n, width = int(answer.headers["x-eft-rows"]), int(answer.headers["x-eft-width"])
    assert (n, width) == (2, 1024) and len(answer.content) == 4 * n * width
    rows = np.frombuffer(answer.content, dtype="<f4").reshape(n, width)
    with trio(LARGE, speculative=False) as session:
        model = session.models["large_base"]
        model.rewind(0)
        want = model.eval([5, 6, 7], all_logits=True)[1:]
    np.testing.assert_allclose(rows, want, atol=TOLERANCE)
    held = httpx.post(served.url + "/eft/rows", json={
        "tokens": [8], "n_past": 2, "prefix": "0" * 32})
    assert held.status_code == 409 and held.json()["error"]["code"] == "prefix_mismatch"


def test_every_command_takes_a_url(served: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    """score, eval, chat (with /stats) and bench on a remote large base."""
    from eft_local import bench

    models = ["-m", f"large_base={served.url}", "-m", LOCAL[0], "-m", LOCAL[1]]
    text = "Has Zhithdou was born in Stainby."
    far = run(["score", *models, text, *THREADS])
    near = run(["score", "-m", f"large_base={LARGE}", *models[2:], text, *THREADS])
    assert far.exit_code == 0 and far.stdout == near.stdout, far.output
    evaluated = run(["eval", *models, "--limit", "3", "--single-turn", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    score = json.loads(evaluated.stdout)["scores"][0]
    assert score["label"] == "--model" and score["n"] == 3 and score["compliant"] == 3
    chat = run(["chat", *models, "-t", "0", "--max-tokens", "8", *THREADS],
               input="Where was Has Zhithdou born?\n/stats\n/quit\n")
    assert chat.exit_code == 0, chat.output
    assert "remote large_base: " in chat.output and "bytes and" in chat.output
    monkeypatch.setattr(bench, "SAMPLER_VOCABS", (1000,))
    benched = run(["bench", *models, "--repeats", "1", "--max-tokens", "4",
                   "--prompt-tokens", "8", "--threads", "2"])
    assert benched.exit_code == 0, benched.output
    assert "large_base alone through its engine" in benched.output
    assert "llama.cpp alone, own process" not in benched.output
    assert "large_base over the network:" in benched.output


def test_the_vocabulary_is_cached_and_a_damaged_cache_is_read_again(served: Remote,
                                                                   isolated_home: Path) -> None:
    from eft_local.presets import preset_from_paths
    from eft_local.session import check_models

    preset = preset_from_paths([f"large_base={served.url}", *LOCAL])
    first = check_models(preset)
    cached = list((isolated_home / ".cache" / "eft-local" / "remote").glob("*.json"))
    assert len(cached) == 1 and first.ok
    damaged = {"hash": json.loads(cached[0].read_text())["hash"], "texts": 7}
    cached[0].write_text(json.dumps(damaged))
    again = check_models(preset)
    assert again.ok and again.vocabs["large_base"].texts == first.vocabs["large_base"].texts
    assert json.loads(cached[0].read_text())["texts"] != 7  # written whole again


def test_two_remote_roles_equal_local(served: Remote) -> None:
    """Several remote roles at once, here both on one engine (each its own client)."""
    def pair(source: str | Path) -> list[str]:
        return [f"large_base={source}", LOCAL[0], f"small_base={source}"]

    with load_session(models=pair(LARGE), options=LoadOptions(n_threads=1)) as near, \
            load_session(models=pair(served.url), options=LoadOptions(n_threads=1)) as far:
        assert far.engine.remote_roles == ("large_base", "small_base")
        for temperature in (0.0, 1.0):
            same_steps(far.generate(PROMPT, max_tokens=20, temperature=temperature, seed=2,
                                    top_n=0),
                       near.generate(PROMPT, max_tokens=20, temperature=temperature, seed=2,
                                     top_n=0))
        assert set(far.stats()["remote"]) == {"large_base", "small_base"}


# -- several sequences at once (issue 23) --------------------------------------------------------
def test_several_sequences_of_one_client_on_the_exact_protocol(tmp_path_factory) -> None:
    """A client running two sequences (-np 2) against an eft-local serving with slots: each
    sequence's rows come from a slot of its own (found by the prefix it names, so each step
    sends only its new token), requests of the two under way at once; the greedy tokens are
    those of the all-local run."""
    server = remotehelp.eft_serve(["tiny-large-base", "-np", "3"],
                                  tmp_path_factory.mktemp("slots"))
    server.start()
    prompts = [PROMPT, "Tova Brint was born in", "The profession of Has Zhithdou is"]
    try:
        def run(session: Session) -> dict[int, Any]:
            jobs = [(i, (lambda p=p: session.prepare(session.raw_tokens(p), temperature=0,
                                                     max_tokens=12, top_n=0)))
                    for i, p in enumerate(prompts)]
            return dict(session.run_many(jobs))

        with trio(LARGE, speculative=False, n_seq=3) as here:
            want = run(here)
        with trio(server.url, speculative=False, n_seq=3) as far:
            assert far.models["large_base"].n_seq == 3
            got = run(far)
            net = far.stats()["remote"]["large_base"]
        for i in range(len(prompts)):
            assert [s.token for s in got[i].steps] == [s.token for s in want[i].steps]
        # each step of each sequence was one request: the engine kept each sequence's
        # prefix in a slot of its own (a mismatch would have resent the whole sequence)
        assert net["requests"] == sum(len(r.steps) for r in got.values())
        assert net["resent"] == 0
    finally:
        server.stop()
