"""Issue 23: ``serve -np N``: requests decode side by side in slots, continuous batching,
prompt caches that survive other requests."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest

from eft_local.remote.exact import prefix_hash
from tests.servehelp import Served, serving, slow_steps

QUESTION = "What is the home town of Has Zhithdou?"
SECOND = "In which year was Has Zhithdou born?"
HISTORY = [{"role": "user", "content": QUESTION}]
TITLE = [{"role": "user", "content": "### Task: Generate a concise title for the chat.\n"
          "### Chat History:\nUSER: " + QUESTION}]


def client(s: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=120)


def ask(s: Served, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return client(s).chat.completions.create(model="tiny-up", messages=messages, **kwargs)


def running(s: Served, at_least: int = 1) -> bool:
    return len(s.runner.running) >= at_least and s.runner.running[0].generated >= 2


def wait(ready: Any, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("slots", [1, 2])
def test_a_request_that_arrives_while_another_streams_does_not_wait_for_it(slots: int) -> None:
    """With two slots the second request decodes beside the first one and ends while the
    first still streams; with one it waits for the whole first answer."""
    with serving("tiny-up", slots=slots) as s:
        slow_steps(s.runner.session, 0.02, endless=True)
        solo = ask(s, [{"role": "user", "content": SECOND}], max_tokens=6)
        long: dict[str, Any] = {}
        first = threading.Thread(target=lambda: long.setdefault(
            "reply", ask(s, HISTORY, max_tokens=150)))
        first.start()
        wait(lambda: running(s), "the first request streams")
        first_job = s.runner.running[0]
        second = ask(s, [{"role": "user", "content": SECOND}], max_tokens=6)
        at_second = first_job.generated
        still_running = first.is_alive()
        first.join(120)
        assert second.choices[0].message.content == solo.choices[0].message.content
        if slots == 2:
            assert still_running and at_second < 150
        else:
            assert not still_running
        assert long["reply"].usage.completion_tokens == 150


def test_a_title_request_between_two_turns_does_not_evict_the_chat() -> None:
    """Open WebUI's pattern: a turn, then its title request, then the next turn. With two
    slots the title takes the other slot and the next turn evaluates only its new messages
    (OpenAI's usage.prompt_tokens_details.cached_tokens, llama-server's timings)."""
    with serving("tiny-up", slots=2) as s:
        first = ask(s, HISTORY)
        ask(s, TITLE, max_tokens=8)
        messages = [*HISTORY, {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": SECOND}]
        second = ask(s, messages)
        cached = second.usage.prompt_tokens_details.cached_tokens
        timings = second.model_extra["timings"]
        assert cached == timings["cache_n"] >= first.usage.prompt_tokens
        assert timings["prompt_n"] == second.usage.prompt_tokens - cached
        assert timings["prompt_n"] < second.usage.prompt_tokens / 2


def test_one_slot_the_title_request_evicts_the_chat() -> None:
    """The same pattern with one slot: what two slots are for (the default is 2)."""
    with serving("tiny-up", slots=1) as s:
        first = ask(s, HISTORY)
        ask(s, TITLE, max_tokens=8)
        messages = [*HISTORY, {"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": SECOND}]
        second = ask(s, messages)
        assert second.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens


def test_exact_rows_are_served_in_a_free_slot_while_a_generation_runs() -> None:
    with serving("tiny-up", slots=2) as s:
        slow_steps(s.runner.session, 0.02, endless=True)
        long = threading.Thread(target=lambda: ask(s, HISTORY, max_tokens=150))
        long.start()
        wait(lambda: running(s), "the generation streams")
        rows = httpx.post(s.url + "/eft/rows", json={
            "role": "large_base", "tokens": [5, 6, 7, 8], "n_past": 0, "first": 3},
            timeout=60)
        assert rows.status_code == 200, rows.text
        assert s.runner.running and s.runner.running[0].generated < 150
        held = s.runner.session.held("large_base", 1)
        # the next request of that client sends only its new token
        more = httpx.post(s.url + "/eft/rows", json={
            "role": "large_base", "tokens": [9], "n_past": 4, "prefix": prefix_hash(held[:4]),
            "first": 4}, timeout=60)
        assert more.status_code == 200, more.text
        long.join(120)


def test_a_request_for_another_preset_waits_for_the_running_ones() -> None:
    """Requests for the loaded preset keep their slots; one naming another preset waits
    until they end (a switch while one ran would close its models under it), then that
    preset loads."""
    with serving("tiny-up", slots=2) as s:
        slow_steps(s.runner.session, 0.01, endless=True)
        long: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: long.setdefault(
            "reply", ask(s, HISTORY, max_tokens=60)))
        thread.start()
        wait(lambda: running(s), "the first request runs")
        other = client(s).chat.completions.create(
            model="tiny-down", messages=[{"role": "user", "content": SECOND}], max_tokens=4,
            temperature=0)
        thread.join(60)
        assert other.model_extra["eft"]["preset"] == "tiny-down"
        assert long["reply"].usage.completion_tokens == 60  # whole, on tiny-up
        assert long["reply"].model_extra["eft"]["preset"] == "tiny-up"
        assert any("loading preset 'tiny-down'" in line for line in s.logs)


def test_the_exact_protocol_never_switches_the_loaded_preset() -> None:
    """Issues 23/25: /eft/rows and /eft/vocab serve what is loaded; naming another preset is
    a 409, not a reload (two clients naming two presets would reload at every token)."""
    with serving("tiny-up", slots=2) as s:
        body = {"model": "tiny-down", "role": "large_base", "tokens": [5, 6, 7], "n_past": 0,
                "first": 2}
        other = httpx.post(s.url + "/eft/rows", json=body, timeout=60)
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "preset_not_loaded"
        vocab = httpx.get(s.url + "/eft/vocab", params={"model": "tiny-down", "role":
                                                         "large_base", "hash_only": "1"})
        assert vocab.status_code == 409
        assert s.runner.loaded == "tiny-up"
        assert not any("loading preset 'tiny-down'" in line for line in s.logs)
        same = httpx.post(s.url + "/eft/rows", json={**body, "model": "tiny-up"}, timeout=60)
        assert same.status_code == 200, same.text


# -- several choices of one prompt (issue 24, item 3) --------------------------------------------
def test_n_choices_are_the_seeds_runs_side_by_side() -> None:
    """``n`` choices: each the reply a single request with seed, seed + 1, ... gives; the
    prompt is read once (the other choices copy its cache) and counted once in usage."""
    with serving("tiny-up", slots=2) as s:
        messages = [{"role": "user", "content": SECOND}]
        many = ask(s, messages, n=3, temperature=1.0, seed=40, max_tokens=12)
        singles = [ask(s, messages, temperature=1.0, seed=40 + i, max_tokens=12)
                   for i in range(3)]
        assert [c.index for c in many.choices] == [0, 1, 2]
        assert [c.message.content for c in many.choices] == [
            x.choices[0].message.content for x in singles]
        assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
        assert many.usage.completion_tokens == sum(x.usage.completion_tokens for x in singles)
        streamed: dict[int, str] = {}
        finishes: dict[int, str] = {}
        for chunk in client(s).chat.completions.create(
                model="tiny-up", messages=messages, n=3, temperature=1.0, seed=40,
                max_tokens=12, stream=True):
            for c in chunk.choices:
                streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
                if c.finish_reason:
                    finishes[c.index] = c.finish_reason
        assert streamed == {c.index: c.message.content for c in many.choices}
        assert sorted(finishes) == [0, 1, 2]


def test_best_of_returns_the_candidates_with_the_highest_mean_log_prob() -> None:
    with serving("tiny-up", slots=2) as s:
        def complete(**kw: Any) -> dict[str, Any]:
            r = httpx.post(s.v1 + "/completions", json={"prompt": "Has Zhithdou was born in",
                                                        "max_tokens": 8, "temperature": 1.0,
                                                        **kw}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        candidates = [complete(seed=7 + i, logprobs=0)["choices"][0] for i in range(4)]

        def mean(choice: dict[str, Any]) -> float:
            lps = choice["logprobs"]["token_logprobs"]
            return sum(lps) / len(lps)

        ranked = sorted(range(4), key=lambda i: (-mean(candidates[i]), i))
        whole = complete(seed=7, best_of=4, n=2)
        best = whole["choices"]
        assert [c["index"] for c in best] == [0, 1]
        single = complete(seed=7)["usage"]["prompt_tokens"]
        assert whole["usage"]["prompt_tokens"] == single  # the prompt counts once
        assert [c["text"] for c in best] == [candidates[i]["text"] for i in ranked[:2]]
        # two prompts, two choices each: prompt p's choice i is at p * 2 + i
        both = complete(prompt=["Has Zhithdou was born in", "Tova Brint was born in"], n=2,
                        seed=3)
        two = both["choices"]
        assert both["usage"]["prompt_tokens"] == single + complete(
            prompt="Tova Brint was born in")["usage"]["prompt_tokens"]  # once per prompt
        assert [c["index"] for c in two] == [0, 1, 2, 3]
        for p, prompt in enumerate(["Has Zhithdou was born in", "Tova Brint was born in"]):
            for i in range(2):
                alone = complete(prompt=prompt, seed=3 + i)["choices"][0]["text"]
                assert two[p * 2 + i]["text"] == alone
        r = httpx.post(s.v1 + "/completions", json={"prompt": "x", "best_of": 2, "n": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
        r = httpx.post(s.v1 + "/completions", json={"prompt": "x", "best_of": 3,
                                                    "stream": True})
        assert r.status_code == 400 and "streamed" in r.json()["error"]["message"]
