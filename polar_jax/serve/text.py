"""Token ids to text and back for the API: incremental detokenization (`Detokenizer`), a
choice's text cut at its first stop string and released to a stream (`Choice`), OpenAI's legacy
logprobs, and chat messages through a Jinja chat template (the tokenizer's or --chat-template's).

A stop string ends its completion at its first occurrence (the text cut there, finish_reason
"stop"); a stream holds back text that could begin one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jinja2

from polar_jax.errors import PolarJaxError
from polar_jax.files import input_file
from polar_jax.serve.request import Done, Token
from polar_jax.serve.protocol import ApiError

DETOKENIZE_CONTEXT = 6  # prompt tokens decoded before a completion's first (spaces, merges)


class Detokenizer:
    """The text of token ids as they arrive. Each id's text is the growth of a small window's
    decoding, released only once complete (not ending in an unfinished UTF-8 character), so
    the pieces join to the decoding of all the ids, special tokens skipped."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = list(context)
        self._start = 0  # the window decoded: ids[start:]
        self._read = len(self._ids)  # ids before `read` are out as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        before = self._decode(self._ids[self._start:self._read])
        after = self._decode(self._ids[self._start:])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes (empty while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self._start, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """What is held back (an unfinished character at the end), as it decodes."""
        text = self._new_text()
        self._start = self._read = len(self._ids)
        return text


@dataclasses.dataclass
class TokenText:
    """A token as OpenAI's legacy logprobs show it: its text, where that starts in the
    completion, its log-probability and the best alternatives (None: a prompt's first token)."""

    text: str
    offset: int
    logprob: float | None
    top: dict[str, float] | None


def logprobs_json(tokens: Sequence[TokenText], start: int) -> dict:
    """OpenAI's legacy logprobs object, offsets counted from `start`."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens],
            "text_offset": [start + t.offset for t in tokens]}


class Choice:
    """One choice's completion as its engine `stream`'s events arrive: the text (cut at the
    first stop string), its tokens, the finish reason, and how much has been released to a
    stream. `index`: its place among the request's choices; `prompt`: its prompt's ids."""

    def __init__(self, index: int, prompt: Sequence[int], stream, tokenizer,
                 stops: Sequence[str]):
        self.index, self.prompt, self.stream = index, prompt, stream
        self._tokenizer = tokenizer
        self._detokenizer = Detokenizer(tokenizer, prompt[-DETOKENIZE_CONTEXT:])
        self._stops = tuple(stops)
        self._longest_stop = max(map(len, self._stops), default=0)
        self.text = ""
        self.tokens: list[TokenText] = []
        self.generated = 0
        self.finish_reason: str | None = None
        self.done: Done | None = None
        self._sent_text = self._sent_tokens = 0

    def alternatives(self, top: Sequence[tuple[int, float]]) -> dict[str, float]:
        return {self._tokenizer.decode([i]): logprob for i, logprob in top}

    def consume(self, event: Token | Done) -> None:
        """Takes the stream's next event (tokens after a stop string are dropped)."""
        if isinstance(event, Token):
            if self.finish_reason is not None:
                return
            self.generated += 1
            self.tokens.append(TokenText("", len(self.text), event.logprob,
                                         self.alternatives(event.top_logprobs)))
            self._extend(self._detokenizer.add(event.id))
        else:
            self.done = event
            self._extend(self._detokenizer.flush())
            self.finish_reason = self.finish_reason or event.reason

    def _extend(self, piece: str) -> None:
        if not piece:
            return
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        self.tokens[-1].text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            self.tokens = [t for t in self.tokens if t.offset < cut]
            for t in self.tokens:
                t.text = t.text[:max(0, cut - t.offset)]
            self.finish_reason = "stop"

    def _held(self) -> int:
        """The length of the longest end of the text that could begin a stop string."""
        for n in range(min(len(self.text), self._longest_stop - 1), 0, -1):
            if any(stop.startswith(self.text[-n:]) for stop in self._stops):
                return n
        return 0

    def release(self) -> tuple[str, list[TokenText]]:
        """The text and tokens not yet released that may go out now: all once finished, else
        all but a possible beginning of a stop string."""
        end, count = len(self.text), len(self.tokens)
        if self.finish_reason is None:
            end -= self._held()
            count = next((i for i, t in enumerate(self.tokens) if t.offset + len(t.text) > end),
                         count)
        text, tokens = self.text[self._sent_text:end], self.tokens[self._sent_tokens:count]
        self._sent_text, self._sent_tokens = end, count
        return text, tokens

    def prompt_tokens(self) -> list[TokenText]:
        """The echoed prompt's tokens with their log-probabilities (from `Done`; None for the
        first)."""
        detokenizer, tokens, offset = Detokenizer(self._tokenizer), [], 0
        logps, tops = self.done.prompt_logprobs, self.done.prompt_top_logprobs
        for i, (token_id, logp, top) in enumerate(zip(self.prompt, logps, tops)):
            text = detokenizer.add(token_id)
            if i == len(self.prompt) - 1:
                text += detokenizer.flush()
            tokens.append(TokenText(text, offset, logp,
                                    None if top is None else self.alternatives(top)))
            offset += len(text)
        return tokens


# -- chat ----------------------------------------------------------------------------------------


def chat_prompt(tokenizer, conversation: list[dict[str, str]],
                template: str | None = None) -> list[int]:
    """The token ids of `conversation` ({"role", "content"} strings) through the chat
    `template` (None: the tokenizer's own), with the generation prompt. A model with neither
    answers 400."""
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, "this model has no chat template (none in its tokenizer_config.json, "
                            "and the server was started without --chat-template): use "
                            "/v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as err:
        raise ApiError(400, f"the chat template refused the messages: {err}", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def read_chat_template(path: str, tokenizer) -> str:
    """The Jinja chat template in the file `path`, once it has rendered a one-message chat
    with `tokenizer` to some text; refused in one line otherwise."""
    where = f"--chat-template {path}"
    try:
        template = input_file(path, "--chat-template").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolarJaxError(f"{where} cannot be read as UTF-8 text: {err}") from None
    if not template.strip():
        raise PolarJaxError(f"{where} is empty: give a Jinja chat template")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}],
                                             chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as err:  # the template's own failure, whatever it raises
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise PolarJaxError(f"{where} does not render a one-message chat: {reason}") from None
    if not isinstance(text, str) or not text.strip():
        raise PolarJaxError(f"{where} renders a one-message chat as empty text: a chat template "
                            "writes the messages (e.g. {% for m in messages %}"
                            "{{ m['content'] }}{% endfor %})")
    return template
