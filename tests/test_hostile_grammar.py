"""Hostile grammars and JSON schemas (issue 22, items 1, 2 and 7; issue 26: one schema
function for every entry point).

A schema or a GBNF text that made llama.cpp's parser overflow the stack, that cost
gigabytes or minutes, or whose ``$ref`` made the converter fetch a URL is refused with one
line naming the limit on every entry point: ``generate --json-schema`` and ``--grammar``,
a batch record (an error record; the batch goes on), the REPL's ``/grammar``, the library
and the server (in a child process run with ``python -O``, where llama-cpp-python's
``assert`` against fetching is gone). Crash cases run in child processes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from eft_local import backend, gbnf, schema, settings, structured
from eft_local.errors import Cancelled, EftError
from eft_local.interrupts import cancel_on
from eft_local.session import Settings
from tests.clihelp import THREADS
from tests.hostilehelp import PATIENCE, Child, send_json
from tests.servehelp import serving
from tests.test_hostile import assert_fails_in_one_line

GREEDY = ["-t", "0", "--max-tokens", "2", *THREADS]
DEEP_GBNF = "root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000 + "\n"
"""Crashed llama.cpp's parser (about 18,600 levels fit in an 8 MiB stack)."""


class Listener:
    """A TCP port on the loopback that records whether anything connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.connected = threading.Event()
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}/schema.json"
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connected.set()
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    port = Listener()
    yield port
    port.close()


def hostile_schemas(url: str) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """Schema -> words its one-line error must hold (the keyword and the limit)."""
    return {
        "maxLength": ({"type": "string", "maxLength": 50_000}, ("'maxLength'", "1000")),
        "minItems": ({"type": "array", "minItems": 40_000_000}, ("'minItems'", "1000")),
        "enum": ({"enum": [f"value {i}" for i in range(5000)]}, ("'enum'", "1000")),
        "ref": ({"type": "object", "properties": {"a": {"$ref": url}}},
                ("'$ref'", "nothing is fetched")),
    }


KINDS = ["maxLength", "minItems", "enum", "ref"]


# -- the limits themselves ----------------------------------------------------------------
@pytest.mark.parametrize(("text", "words"), [
    (DEEP_GBNF, ("nests groups 1,025 deep", "1,024")),
    ("root ::= " + '"a"? ' * 8000, ("8,001 places at once", "2,048")),
    ("root ::= " + "x " * 3000 + '\nx ::= "a" | ', ("3,001 places", "2,048")),
    ("root ::= " + "x " * 100 + '\nx ::= "a" | ', ("costs about 1,000,000 steps", "250,000")),
    ("root ::= " + " | ".join(f'"{i}"' for i in range(3000)), ("alternatives", "2,048")),
    ('root ::= "' + "a" * 10_000 + '"{2000}', ("expands to 20,000,00", "4,194,304")),
    ('root ::= "a"{0,5000}', ("{0,5000}", "2,000")),
    ('root ::= [0-9]{99999999999999999999}', ("{99999999999999999999}", "2,000")),
    ("root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x"\n' for i in range(2000)) + 'r2000 ::= "y"',
     ("chain of rules", "1,024")),
    ("root ::= " + '("a") ' * 21_000, ("makes 20,001 rules", "20,000")),
    ('root ::= "' + "a" * 300_000 + '"', ("300,011 characters", "262,144")),
])
def test_22_1_a_grammar_past_a_limit_is_refused_before_llama_cpp(text: str, words) -> None:
    with pytest.raises(EftError) as caught:
        gbnf.check_gbnf(text)  # (backend.check_grammar calls it first: see the CLI tests)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_22_1_grammars_within_the_limits_pass_as_before() -> None:
    from tests.shapes import Shape

    for text in (backend.json_schema_grammar({"type": "string", "maxLength": 1000}),
                 backend.json_schema_grammar({"enum": [f"v{i}" for i in range(1000)]}),
                 backend.json_schema_grammar(Shape.model_json_schema()),
                 'root ::= "a" root "b" | "x"', 'root ::= [0-9]{1,2000} ("." [0-9]+)?'):
        assert backend.check_grammar(text) == text
    shape = gbnf.check_gbnf(backend.json_schema_grammar({"type": "string", "maxLength": 1000}))
    assert shape.nesting == 1000 and shape.branches < 10


LIBRARY_CHILD = """
import json, sys
from eft_local.formula import parse_formula
from eft_local.session import Settings

s = Settings(formula=parse_formula("small_ft", roles=("small_ft",)))
out = {}
for kind, value in json.loads(sys.argv[1]).items():
    for how, call in (("mapping", lambda: s.replace(json_schema=value)),
                      ("text", lambda: s.replace(json_schema=json.dumps(value))),
                      ("grammar_of", lambda: Settings.grammar_of(json_schema=value))):
        try:
            call()
            out[f"{kind} {how}"] = "accepted"
        except Exception as exc:
            out[f"{kind} {how}"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def test_22_every_schema_limit_is_named_in_the_library(listener: Listener) -> None:
    """``Settings.replace(json_schema=...)`` (a mapping or JSON text) and
    ``Settings.grammar_of``, in a child process (``maxLength`` 50,000 crashed)."""
    code = LIBRARY_CHILD
    cases = hostile_schemas(listener.url)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(
        {kind: value for kind, (value, _) in cases.items()})], capture_output=True, text=True,
        timeout=300, env={**_env(), "PYTHONOPTIMIZE": "1"}, preexec_fn=_memory_limit)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    results = json.loads(proc.stdout)
    for kind, (_, words) in cases.items():
        for how in ("mapping", "text", "grammar_of"):
            got = results[f"{kind} {how}"]
            assert got.startswith("EftError: ") and all(w in got for w in words), (kind, got)
    assert not listener.connected.is_set()


@pytest.mark.parametrize(("value", "words"), [
    ({"$ref": "http://127.0.0.1:9/x"}, ("'$ref'",)),
    ({"$ref": "file:///etc/passwd"}, ("'$ref'",)),
    ({"$ref": "other.json#/a"}, ("'$ref'",)),
    ({"anyOf": [{"const": {"$ref": "https://x.invalid/"}}]}, ("'$ref'",)),  # the converter
    ({"$ref": 5}, ("'$ref'",)),                                             # looks in consts
    ({"type": "string", "maxLength": -1}, ("'maxLength'", "from 0 to 1000")),
    ({"type": "array", "maxItems": 1.5}, ("'maxItems'", "whole number")),
    ({"type": "string", "pattern": "^a{0,5000}$"}, ("'pattern'", "1000")),
    ({"type": "object", "properties": {f"p{i}": {} for i in range(300)}},
     ("300 optional properties", "256")),
    (json.loads('{"a": ' * 70 + "1" + "}" * 70), ("more than 64",)),
    ({"const": "x" * 300_000}, ("characters long", "262,144")),
    ({"type": "object", "properties": {str(i): {"type": "array", "minItems": 1000, "items": {
        "type": "null"}} for i in range(21)}}, ("add up to more than 20,000",)),
    ({"$defs": {"a": {"type": "object", "properties": {str(i): {"type": "null"}
                                                       for i in range(200)}}},
      "allOf": [{"$ref": "#/$defs/a"}] * 100}, ("visit more than 10,000", "allOf")),
])
def test_22_schema_bounds_before_the_converter(value: dict, words) -> None:
    with pytest.raises(EftError) as caught:
        schema.schema_grammar(value)
    assert all(w in str(caught.value) for w in words), caught.value


def test_22_7_no_ref_is_ever_fetched_under_python_O(listener: Listener, tmp_path) -> None:
    """llama-cpp-python's converter guards a remote ``$ref`` with an ``assert`` only: under
    ``python -O`` it fetched the URL (here: a TLS hello arrived at the listener)."""
    code = ("import sys\nfrom eft_local import backend\ntry:\n"
            f"    backend.json_schema_grammar({{'$ref': {listener.url!r}}})\n"
            "except Exception as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert "'$ref'" in proc.stdout and "nothing is fetched" in proc.stdout, proc
    assert not listener.connected.wait(0.5)


# -- generate --json-schema / --grammar, in a child process ---------------------------------
@pytest.mark.parametrize("kind", ["maxLength", "minItems", "enum", "ref", "gbnf"])
def test_22_1_2_7_generate_refuses_in_one_line(kind: str, family, tmp_path,
                                               listener: Listener) -> None:
    if kind == "gbnf":
        path, words = tmp_path / "deep.gbnf", ("nests groups", "1,024")
        path.write_text(DEEP_GBNF)
        option = "--grammar"
    else:
        value, words = hostile_schemas(listener.url)[kind]
        path, option = tmp_path / "schema.json", "--json-schema"
        path.write_text(json.dumps(value))
    proc = cli(["generate", "-m", f"small_ft={family.small_ft}", *GREEDY, option, str(path),
                "hi"], env={"PYTHONOPTIMIZE": "1"}, address_space=3_000_000_000)
    error = assert_fails_in_one_line(proc, str(path), *words)
    assert "\n" not in error
    assert not listener.connected.is_set()


def test_22_2_a_grammar_whose_work_multiplies_is_stopped_at_the_step_limit(family, tmp_path
                                                                         ) -> None:
    """Every "a" doubles llama.cpp's stacks: the 14th token took 81 s, the next ones hours.
    The limit of one token's grammar work (1 s here) ends it in one line."""
    path = tmp_path / "doubling.gbnf"
    path.write_text('root ::= "a" root "b" | "a" root "c"\n')
    prelude = "import eft_local.backend.tools as t\nt.MAX_STEP_SECONDS = 1.0\n"
    proc = cli(["generate", "-m", f"small_ft={family.small_ft}", "-t", "0", "--max-tokens",
                "60", *THREADS, "--grammar", str(path), "hi"], prelude=prelude, timeout=300)
    assert_fails_in_one_line(proc, "the grammar took more than 1 s for one token")


# -- a batch: error records, the batch goes on, --skip-errors works --------------------------
def test_22_1_2_7_batch_records_become_error_records(family, tmp_path, listener) -> None:
    schemas = hostile_schemas(listener.url)
    lines = [{"id": "first", "prompt": "Hi"}]
    lines += [{"id": kind, "prompt": "x", "json_schema": value}
              for kind, (value, _) in schemas.items()]
    lines += [{"id": "gbnf", "prompt": "x", "grammar": DEEP_GBNF},
              {"id": "last", "prompt": "Hello", "json_schema": {"type": "string",
                                                                "maxLength": 3}}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["generate", "-m", f"small_ft={family.small_ft}", *GREEDY, "--input", str(src),
            "--output", str(out)]
    proc = cli(args, env={"PYTHONOPTIMIZE": "1"}, address_space=3_000_000_000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "text" in records["first"] and "text" in records["last"]
    for kind, (_, words) in schemas.items():
        assert all(w in records[kind]["error"] for w in words), records[kind]
    assert "nests groups" in records["gbnf"]["error"]
    rerun = cli([*args, "--skip-errors"])
    assert rerun.returncode == 0 and rerun.stderr.splitlines()[-1] == (
        "0 generated, 0 errors, 7 already done"), rerun.stderr
    assert not listener.connected.is_set()


# -- the REPL's /grammar ---------------------------------------------------------------------
def test_22_1_2_repl_grammar_refuses_and_the_session_goes_on(family, tmp_path) -> None:
    deep = tmp_path / "deep.gbnf"
    deep.write_text(DEEP_GBNF)
    items = tmp_path / "items.json"
    items.write_text(json.dumps({"type": "array", "minItems": 40_000_000}))
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({"type": "integer", "not": {"const": 0}}))
    script = f"/grammar {deep}\n/grammar {items}\n/grammar {loose}\nhi\n/quit\n"
    proc = cli(["chat", "-m", f"small_ft={family.small_ft}", *GREEDY], stdin=script,
               address_space=3_000_000_000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "nests groups" in errors[0] and "'minItems'" in errors[1]
    assert "note: " in proc.stdout and "'not'" in proc.stdout  # not strict: a note
    assert "replies follow the JSON schema" in proc.stdout


# -- the server, in a child process under python -O --------------------------------------------
@pytest.fixture(scope="module")
def optimized_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``eft-local serve`` run with ``python -O`` (PYTHONOPTIMIZE): its URL."""
    home = tmp_path_factory.mktemp("home")
    (home / "models.toml").write_text("")
    child = Child(["serve", "tiny-up", "--port", "0", *THREADS, "--schedule", "sequential",
                   "-t", "0"],
                  env={**_env(home), "PYTHONOPTIMIZE": "1"})
    try:
        child.wait_for(lambda: " on http://" in child.stderr, "the server listens")
        url = child.stderr.split(" on ", 1)[1].split("/v1", 1)[0]
        yield url
        assert child.proc.poll() is None, f"the server died: {child.stderr[-3000:]}"
    finally:
        child.kill()


def _bodies(kind: str, value: dict) -> list[tuple[str, dict, str]]:
    """(path, body, param) for each way a request carries a schema."""
    msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": value}, "required": ["x"]}}}
    return [
        ("/v1/chat/completions", {**msg, "json_schema": value}, "json_schema"),
        ("/v1/chat/completions", {**msg, "response_format": {"type": "json_schema",
                                                             "json_schema": {"name": kind,
                                                                             "schema": value}}},
         "response_format.json_schema.schema"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "response_format": {
            "type": "json_object", "schema": value}}, "response_format.schema"),
        ("/v1/chat/completions", {**msg, "tools": [tool], "tool_choice": "required"},
         "tools[0].function.parameters"),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_22_1_2_7_the_server_answers_400_naming_the_limit(kind: str, optimized_server: str,
                                                          listener: Listener) -> None:
    value, words = hostile_schemas(listener.url)[kind]
    with httpx.Client(timeout=PATIENCE) as http:
        for path, body, param in _bodies(kind, value):
            r = http.post(optimized_server + path, json=body)
            assert r.status_code == 400, (path, r.text[:500])
            error = r.json()["error"]
            assert error["param"] == param and all(w in error["message"] for w in words), error
        r = http.post(optimized_server + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "grammar": DEEP_GBNF})
        assert r.status_code == 400 and "nests groups" in r.json()["error"]["message"], r.text
        ok = http.post(optimized_server + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "json_schema": {"type": "string", "maxLength": 5}})
        assert ok.status_code == 200, ok.text
    assert not listener.connected.is_set()


# -- grammar work stops when its job is cancelled -------------------------------------------
def test_22_2_a_cancelled_job_stops_inside_a_grammar_check(monkeypatch) -> None:
    """A check of every token is made of llama.cpp calls of at most CHUNK tokens, and a job
    whose client left stops between two: the check under way when the client leaves
    (held here until the server notices) is the last work the grammar does."""
    from eft_local.backend import library, tools

    monkeypatch.setattr(tools, "CHUNK", 16, raising=False)
    original = library.L.llama_sampler_apply
    held, done_after = threading.Event(), []
    with serving() as served:

        def apply(handle, array):  # noqa: ANN001, ANN202
            size = array._obj.size
            job = served.runner.current
            if size >= 16 and not held.is_set() and job is not None:
                held.set()  # hold the first check until the server notices the client left
                deadline = time.monotonic() + PATIENCE
                while not job.cancelled.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
            original(handle, array)
            if job is not None and job.cancelled.is_set():
                done_after.append(size)

        monkeypatch.setattr(library.L, "llama_sampler_apply", apply)
        sock = send_json(served.url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "top_p": 0.5,
            "stream": True, "grammar": "root ::= [a-z ]+"})
        assert held.wait(PATIENCE), "no grammar check began"
        job = served.runner.current
        sock.close()
        deadline = time.monotonic() + PATIENCE
        while job not in served.runner.history:
            assert time.monotonic() < deadline, "the job did not end"
            time.sleep(0.01)
    assert job.cancelled.is_set()
    assert sum(done_after) <= 16, done_after  # the rest of the vocabulary was never asked


def test_22_2_grammar_checks_stop_on_the_job_and_on_the_step_limit(family, monkeypatch
                                                                   ) -> None:
    from eft_local.backend import tools
    from eft_local.session import LoadOptions, load_session

    monkeypatch.setattr(tools, "CHUNK", 8)
    with load_session(models=[f"small_ft={family.small_ft}"],
                      options=LoadOptions(n_threads=1)) as s:
        ids = np.arange(s.vocab_size)
        grammar = s.grammar('root ::= [a-z]+')
        want = grammar.allowed(ids)
        assert want.any() and not want.all()
        stop = threading.Event()
        with cancel_on(stop):
            assert (grammar.allowed(ids) == want).all()
            stop.set()
            with pytest.raises(Cancelled):
                grammar.allowed(ids)
        assert (grammar.allowed(ids) == want).all()  # outside the block: no stop
        monkeypatch.setattr(tools, "MAX_STEP_SECONDS", 0.0)
        with pytest.raises(EftError, match="more than 0 s for one token"):
            grammar.allowed(ids)


# -- issue 26: one schema function, one treatment ---------------------------------------------
def test_26_one_schema_function_for_every_entry_point() -> None:
    assert settings.schema_grammar is schema.schema_grammar
    assert structured.schema_grammar is schema.schema_grammar
    assert structured.unenforced is schema.unenforced


def test_26_an_unenforced_keyword_is_a_note_unless_strict(family, tmp_path) -> None:
    loose = {"type": "object", "properties": {"age": {"type": "integer", "not": {"const": 3}}},
             "required": ["age"]}
    path = tmp_path / "loose.json"
    path.write_text(json.dumps(loose))
    proc = cli(["generate", "-m", f"small_ft={family.small_ft}", *GREEDY, "--json-schema",
                str(path), "hi"])
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {path}: the JSON schema uses 'not' at schema.properties.age, "
                     "which constrained decoding can neither enforce nor check: the reply may "
                     "not follow it"]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "hi", "json_schema": loose}) + "\n")
    proc = cli(["generate", "-m", f"small_ft={family.small_ft}", *GREEDY, "--input", str(src)])
    assert proc.returncode == 0 and "note: line 1 (id 'a'): the JSON schema uses 'not'" \
        in proc.stderr, proc.stderr
    seen: list[str] = []
    assert "root ::=" in Settings.grammar_of(json_schema=loose, note=seen.append)
    assert seen and "'not'" in seen[0]
    with pytest.raises(EftError, match="strict but uses 'not'"):
        Settings.grammar_of(json_schema=loose, strict=True)


def test_24_what_only_the_finished_reply_can_show_is_checked_and_said(family,
                                                                     tmp_path) -> None:
    # no integer from 1 to 6 is a multiple of 7: the grammar holds the range, the check
    # finds the multiple missing, whatever the model writes
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                     "maximum": 6, "multipleOf": 7}},
              "required": ["n"]}
    path = tmp_path / "seven.json"
    path.write_text(json.dumps(schema))
    proc = cli(["generate", "-m", f"small_ft={family.small_ft}", *GREEDY, "--json-schema",
                str(path), "--max-tokens", "40", "hi"])
    assert proc.returncode == 0, proc.stderr
    n = json.loads(proc.stdout)["n"]
    assert 1 <= n <= 6
    assert proc.stderr.splitlines() == [
        "note: the reply does not follow the JSON schema: 'multipleOf' at "
        f"schema.properties.n: reply.n is {n}, not a multiple of 7"]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "b", "prompt": "hi", "max_tokens": 40}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = cli(["generate", "-m", f"small_ft={family.small_ft}", *GREEDY, "--json-schema",
                str(path), "--input", str(src), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["schema_violations"] == [
        f"'multipleOf' at schema.properties.n: reply.n is {json.loads(record['text'])['n']}, "
        "not a multiple of 7"]
    assert "note: line 1 (id 'b'): the reply does not follow the JSON schema" in proc.stderr
    with pytest.raises(EftError, match="strict but uses 'multipleOf' at schema.properties.n"
                       ".*without strict, the finished reply is checked against it"):
        Settings.grammar_of(json_schema=schema, strict=True)


# -- helpers ------------------------------------------------------------------------------------
def cli(args: list[str], *, prelude: str = "", stdin: str = "", env: dict[str, str] | None = None,
        address_space: int | None = None, timeout: float = 180
        ) -> subprocess.CompletedProcess[str]:
    """``eft-local ARGS`` in a child process (after Python code ``prelude``; ``env`` added
    to this one's; ``address_space``: its memory limit in bytes)."""
    import resource

    code = f"import sys\n{prelude}\nfrom eft_local.cli.main import main\nmain(sys.argv[1:])"

    def limit() -> None:
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run([sys.executable, "-c", code, *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env={**_env(), **(env or {})},
                          preexec_fn=limit)


def _memory_limit() -> None:
    """A child's address space: 3 GB (minItems 40,000,000 took 3.5 GiB)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3_000_000_000, 3_000_000_000))


def _env(home: Path | None = None) -> dict[str, str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("EFT_LOCAL_DEBUG", None)
    if home is not None:
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_DATA_HOME=str(home / ".local/share"),
                   XDG_CACHE_HOME=str(home / ".cache"),
                   EFT_LOCAL_CONFIG=str(home / "models.toml"))
    return env
