"""A session's prompts and text: chat templates rendered and tokenized, raw text, token
text, grammars over the vocabulary, and fitting a chat to the context.

:class:`Prompts` is the part of :class:`eft_local.session.Session` that turns what a caller
gives (messages, text, a grammar) into tokens and back; it reads the session's preset,
models, alignment report and default settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from eft_local import backend, structured, utf8
from eft_local.chat import Conversation, fit_messages
from eft_local.engine import Engine, Model
from eft_local.errors import ContextFull, EftError
from eft_local.presets import Preset
from eft_local.settings import Settings
from eft_local.templates import special_pattern, tokenize_messages
from eft_local.vocab import AlignmentReport


class Prompts:
    """Prompt and text methods of a session (see the module docstring)."""

    preset: Preset
    models: dict[str, Model]
    report: AlignmentReport
    template: str
    defaults: Settings
    engine: Engine
    _specials: re.Pattern[str] | bool | None
    _pieces: utf8.Pieces | None
    _longest: int | None

    @property
    def vocab_size(self) -> int:
        """Token ids are ``0 .. vocab_size - 1`` (the models' common range)."""
        return self.engine.width

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], *,
                    parse_special: bool | None = None,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Render ``messages`` (and ``tools``, OpenAI's function cards) with the chat
        template and tokenize them.

        Tool cards, assistant ``tool_calls`` and ``tool`` messages go to the template where
        it renders them, else into plain messages (:func:`eft_local.structured.tool_messages`).

        The template's own text is tokenized with special-token parsing; the messages'
        content is not, so a control token's text typed in a message (``<|im_end|>``...)
        stays plain text and cannot fake a turn. ``parse_special`` (default: that of
        :attr:`defaults`) parses it too: the raw behaviour, for trusted input only.
        BOS comes first when the model asks for it (``add_bos``) and the template did not
        write it.
        """
        vocab = self.report.vocabs.get(self.preset.template_role)
        special = self.defaults.parse_special if parse_special is None else parse_special
        if not special and self._specials is None:
            self._specials = special_pattern(vocab) or False
        messages, cards = structured.tool_messages(self.template, messages, tools)
        tokens = tokenize_messages(self.template, messages,
                                   self.models[self.preset.template_role], vocab,
                                   specials=None if special else self._specials or None,
                                   tools=cards)
        if vocab and vocab.add_bos and vocab.bos >= 0 and tokens[:1] != [vocab.bos]:
            return [vocab.bos, *tokens]
        return tokens

    def special_count(self, text: str) -> int:
        """How many control-token texts (``<|im_end|>``...) ``text`` holds: with special-token
        parsing, that many tokens at least (and llama.cpp's parsing costs their number times
        the text's length: count before tokenizing untrusted text)."""
        if self._specials is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            self._specials = special_pattern(vocab) or False
        return sum(1 for _ in self._specials.finditer(text)) if self._specials else 0

    @property
    def longest_token(self) -> int:
        """The most bytes a token's text has: a text of N characters is at least N / this
        many tokens (a check that needs no tokenizing)."""
        if self._longest is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            self._longest = max((len(t) for t in vocab.texts), default=1) if vocab else 1
        return max(1, self._longest)

    def tokenize(self, text: str, *, add_bos: bool = True, parse_special: bool = False
                 ) -> list[int]:
        """Tokenize plain text with the template model's tokenizer: BOS first when
        ``add_bos`` and the vocabulary asks for it; control-token text parsed as control
        tokens only with ``parse_special``."""
        return self.models[self.preset.template_role].tokenize(text, add_bos=add_bos,
                                                               special=parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (control tokens as their text), UTF-8 decoded as a whole."""
        ref = self.models[self.preset.template_role]
        n_vocab = ref.n_vocab
        bad = next((t for t in tokens if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < n_vocab), None)
        if bad is not None:
            raise EftError(f"token id {bad!r} is outside the vocabulary (0..{n_vocab - 1})")
        return b"".join(ref.piece(t, special=True) for t in tokens).decode("utf-8", "replace")

    def raw_tokens(self, prompt: str) -> list[int]:
        """Tokenize plain text (BOS added if the model's vocabulary asks for it)."""
        return self.models[self.preset.template_role].tokenize(prompt, add_bos=True,
                                                               special=False)

    def grammar(self, text: str) -> utf8.Guarded:
        """A fresh state of the GBNF grammar ``text`` over the template model's vocabulary,
        which also keeps the text well-formed UTF-8 (:mod:`eft_local.utf8`)."""
        ref = self.models[self.preset.template_role]
        if not isinstance(ref, backend.LlamaModel):
            raise EftError("grammars need models loaded by llama.cpp")
        if self._pieces is None:
            vocab = self.report.vocabs.get(self.preset.template_role)
            self._pieces = utf8.Pieces([ref.piece(t) for t in range(self.vocab_size)],
                                       [t for t in (vocab.eog if vocab else ())
                                        if t < self.vocab_size])
        return utf8.Guarded(backend.Grammar(ref, text), utf8.Utf8Guard(self._pieces))

    def prompt_tokens(self, prompt: str, *, raw: bool = True, system: str | None = None,
                      parse_special: bool | None = None) -> list[int]:
        """Tokens for a one-off prompt: ``raw`` text as is, else one chat turn."""
        if raw:
            return self.raw_tokens(prompt)
        conv = Conversation(system=system, turns=[{"role": "user", "content": prompt}])
        return self.chat_tokens(conv.messages(), parse_special=parse_special)

    def fit_chat(self, messages: list[dict[str, Any]], *, settings: Settings | None = None,
                 max_tokens: int = 512, tools: Sequence[Mapping[str, Any]] | None = None
                 ) -> tuple[list[int], list[dict[str, Any]], int]:
        """The prompt of ``messages`` (and ``tools``, as :meth:`chat_tokens`) under the
        context policy of ``settings`` (default :attr:`defaults`): ``(tokens, messages
        kept, messages dropped)``.

        ``truncate`` drops the oldest whole turns (system messages and the newest message
        stay) until a reply of ``min(max_tokens, n_ctx / 4)`` tokens fits after the prompt;
        when the newest message needs more, the reply gets the room left. ``error`` keeps
        every message. Either way a prompt that leaves no room for one token is a
        :class:`~eft_local.errors.ContextFull` error.
        """
        s = settings or self.defaults
        n_ctx = self.engine.n_ctx
        rendered: dict[int, list[int]] = {}

        def count(msgs: list[dict[str, str]]) -> int:
            rendered[len(msgs)] = found = self.chat_tokens(msgs, parse_special=s.parse_special,
                                                           tools=tools)
            return len(found)

        if s.context_overflow == "error":
            need = count(messages)
            if need >= n_ctx:
                raise ContextFull(f"the conversation needs {need} tokens but the context holds "
                                  f"{n_ctx}; drop older turns (context overflow 'truncate') "
                                  "or raise n_ctx")
            return rendered[len(messages)], list(messages), 0

        def chars(msgs: list[dict[str, Any]]) -> int:
            return sum(len(m["content"]) for m in msgs if isinstance(m.get("content"), str))

        reserve = min(max_tokens, n_ctx // 4)
        most = self.longest_token  # first what the characters alone decide (N characters:
        try:  # N / most tokens at least), so that a long history is never tokenized whole
            fewer, gone = fit_messages(messages, chars, (n_ctx - reserve) * most,
                                       limit=(n_ctx - 1) * most)
        except ContextFull:  # too long even alone: tokenized alone, for the error's count
            fewer, gone = fit_messages(messages, chars, 0, limit=chars(messages))
        kept, dropped = fit_messages(fewer, count, n_ctx - reserve, limit=n_ctx - 1)
        tokens = rendered.get(len(kept)) or self.chat_tokens(kept, parse_special=s.parse_special,
                                                             tools=tools)
        return tokens, kept, gone + dropped

    def token_text(self, token: int) -> str:
        """A token's text, control tokens shown as themselves."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        """A token's bytes, control tokens as their text."""
        return self.models[self.preset.template_role].piece(token, special=True)
