"""JSONL batch generation: bad records become error records, reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

from tests.clihelp import THREADS, api_session, run, stdout

OPTS = ["-t", "0", "--max-tokens", "4", *THREADS]


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Records as JSON lines; strings are written as they are (for broken lines)."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").split("\n") if line]


def expected_texts(family, prompts: dict[str, dict]) -> dict[str, str]:
    """What the library itself generates for each record (greedy, 4 tokens)."""
    with api_session(family.pairs(), temperature=0) as s:
        return {key: s.generate(rec["prompt"], raw=rec.get("raw", False),
                                system=rec.get("system"),
                                max_tokens=rec.get("max_tokens", 4)).text
                for key, rec in prompts.items()}


def test_batch_with_bad_records_goes_on(family, tmp_path: Path) -> None:
    good = {"a": {"id": "a", "prompt": "Hello"},
            "b": {"id": 7, "prompt": "Once upon", "raw": True, "max_tokens": 2},
            "c": {"prompt": "No id here", "system": "Be brief"}}
    src = write_jsonl(tmp_path / "in.jsonl", [
        good["a"],
        "{not json",
        {"id": "no-prompt"},
        {"id": "bad-type", "prompt": "Hi", "max_tokens": "many"},
        {"id": "too-long", "prompt": "x" * 300, "raw": True},
        "",
        good["b"],
        {"id": "a", "prompt": "again"},
        good["c"],
        [1, 2],
        {"id": True, "prompt": "Hi"},
    ])
    out = tmp_path / "out.jsonl"
    result = run(["generate", *family.trio(), *OPTS, "--input", str(src), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert stdout(result) == ""
    records = read_jsonl(out)
    texts = expected_texts(family, good)
    assert [r["id"] for r in records] == ["a", None, "no-prompt", "bad-type", "too-long", 7,
                                          "a", 9, None, None]
    assert records[0]["text"] == texts["a"] and records[0]["finish"] == "length"
    assert records[5]["text"] == texts["b"] and records[5]["generated_tokens"] == 2
    assert records[7]["text"] == texts["c"]  # the id defaults to the line number
    errors = {i: r["error"] for i, r in enumerate(records) if "error" in r}
    assert sorted(errors) == [1, 2, 3, 4, 6, 8, 9]
    assert errors[1].startswith("not JSON") and records[1]["line"] == 2
    assert errors[2] == "missing 'prompt'"
    assert errors[3] == "'max_tokens' must be int, got 'many'"
    assert "300 tokens" in errors[4]
    assert errors[6] == "duplicate id 'a'"
    assert errors[8] == "a record must be a JSON object"
    assert errors[9] == "'id' must be str or int, got True"
    progress = result.stderr.splitlines()
    assert "1/10 a: length" in progress
    assert "10/10 line 11: error: 'id' must be str or int, got True" in progress
    assert progress[-1] == "3 generated, 7 errors, 0 already done"


def test_batch_resumes_and_appends_only_new_records(family, tmp_path: Path) -> None:
    first = [{"id": 1, "prompt": "one"}, {"id": 2, "prompt": "two"}, "{broken"]
    src = write_jsonl(tmp_path / "in.jsonl", first)
    out = tmp_path / "out.jsonl"
    args = ["generate", *family.trio(), *OPTS, "--input", str(src), "--output", str(out)]
    assert run(args).exit_code == 0
    before = out.read_bytes()
    assert [r["id"] for r in read_jsonl(out)] == [1, 2, None]

    write_jsonl(src, [*first, {"id": 3, "prompt": "three"}])
    again = run(args)
    assert again.exit_code == 0, again.output
    after = out.read_bytes()
    assert after.startswith(before)
    new = read_jsonl(out)[3:]
    assert new[1]["text"] == expected_texts(family, {"3": {"prompt": "three"}})["3"]
    # the broken line is tried again (and fails again): its new error record is appended
    assert again.stderr.splitlines()[-1] == ("1 generated, 1 errors, 2 already done "
                                             "(1 earlier errors retried)")
    assert [r["id"] for r in new] == [None, 3] and "error" in new[0]
    skipped = run([*args, "--skip-errors"])
    assert skipped.stderr.splitlines()[-1] == "0 generated, 0 errors, 4 already done"
    assert out.read_bytes() == after


def test_batch_drops_a_torn_last_line(family, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "prompt": "Hi"},
                                             {"id": "y", "prompt": "Yo"}])
    out = tmp_path / "out.jsonl"
    args = ["generate", *family.trio(), *OPTS, "--input", str(src), "--output", str(out)]
    assert run(args).exit_code == 0
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.index(b"\n") + 10])  # killed while writing record y
    result = run(args)
    assert result.exit_code == 0
    assert "dropped an incomplete last line" in result.stderr
    assert out.read_bytes() == whole


def test_batch_json_diagnostics_to_stdout(family, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "q", "prompt": "Hi"}])
    result = run(["generate", *family.trio(), *OPTS, "--json", "--input", str(src)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in stdout(result).splitlines()]
    assert record["id"] == "q"
    assert len(record["tokens"]) == record["generated_tokens"] == 4
    assert set(record["tokens"][0]) == {"position", "token", "text", "p_mix", "p_models",
                                        "ref_token", "differs"}


def test_batch_input_that_is_not_utf8(family, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"prompt": "\xff"}\n')
    result = run(["generate", *family.trio(), *OPTS, "--input", str(src)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(f"error: {src}: not UTF-8 text")


def test_batch_rerun_retries_error_records_and_keeps_their_history(family, tmp_path: Path
                                                                  ) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "ok", "prompt": "Hi"},
                                             {"id": "long", "prompt": "x" * 300, "raw": True}])
    out = tmp_path / "out.jsonl"
    args = ["generate", *family.trio(), *OPTS, "--input", str(src), "--output", str(out)]
    assert run(args).stderr.splitlines()[-1] == "1 generated, 1 errors, 0 already done"
    first = out.read_bytes()
    # still failing, skipped on request: nothing is appended
    assert run([*args, "--skip-errors"]).stderr.splitlines()[-1] == (
        "0 generated, 0 errors, 2 already done")
    assert out.read_bytes() == first
    # the user shortens the prompt: a plain rerun retries it and appends the result
    write_jsonl(src, [{"id": "ok", "prompt": "Hi"}, {"id": "long", "prompt": "x y z"}])
    again = run(args)
    assert again.exit_code == 0, again.output
    assert "2/2 long: length (retried)" in again.stderr.splitlines()
    assert again.stderr.splitlines()[-1] == ("1 generated, 0 errors, 1 already done "
                                             "(1 earlier errors retried)")
    assert out.read_bytes().startswith(first)  # the error record stays as history
    records = read_jsonl(out)
    assert [(r["id"], "error" in r) for r in records] == [("ok", False), ("long", True),
                                                          ("long", False)]
    assert run(args).stderr.splitlines()[-1] == "0 generated, 0 errors, 2 already done"


def test_skip_errors_needs_input(family) -> None:
    result = run(["generate", *family.trio(), *OPTS, "--skip-errors", "Hi"])
    assert result.exit_code == 2 and "--skip-errors needs --input" in result.stderr


# -- several records at once (issue 23) ---------------------------------------------------------
PROMPTS = ["What is the home town of Has Zhithdou?", "In which year was Has Zhithdou born?",
           "Where does Has Zhithdou live?", "What does Has Zhithdou do for a living?",
           "Hello", "Once upon a time"]


def test_records_in_parallel_give_what_one_at_a_time_gives(family, tmp_path: Path) -> None:
    """-np 3: three records decode side by side; greedy texts equal one at a time (the
    records come in the order they finish); a rerun skips every one of them."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": p}
                                              for i, p in enumerate(PROMPTS)])
    texts = {}
    for np_ in ("1", "3", "3 -kvu"):  # -kvu: one KV cache for the three sequences
        out = tmp_path / f"out{np_[0]}.jsonl"
        out.unlink(missing_ok=True)
        result = run(["generate", *family.trio(), *OPTS, "--max-tokens", "12", "--input",
                      str(src), "--output", str(out), "-np", *np_.split()])
        assert result.exit_code == 0, result.output
        records = read_jsonl(out)
        assert sorted(r["id"] for r in records) == list(range(len(PROMPTS)))
        texts[np_] = {r["id"]: (r["text"], r["finish"]) for r in records}
    assert texts["3"] == texts["1"] == texts["3 -kvu"]
    again = run(["generate", *family.trio(), *OPTS, "--input", str(src), "--output",
                 str(tmp_path / "out3.jsonl"), "-np", "3"])
    assert again.stderr.splitlines()[-1] == f"0 generated, 0 errors, {len(PROMPTS)} already done"


def test_texts_scored_together_score_as_alone(family, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": p}
                                              for i, p in enumerate(PROMPTS)])
    scores = {}
    for np_ in ("1", "4"):
        out = tmp_path / f"scores{np_}.jsonl"
        result = run(["score", *family.trio(), *THREADS, "--input", str(src), "--output",
                      str(out), "-np", np_])
        assert result.exit_code == 0, result.output
        scores[np_] = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(scores["4"]) == list(range(len(PROMPTS)))
    for i in scores["1"]:
        one, four = scores["1"][i], scores["4"][i]
        assert one["tokens"] == four["tokens"]
        assert abs(one["logprob"] - four["logprob"]) <= 1e-3 * max(1.0, abs(one["logprob"]))
