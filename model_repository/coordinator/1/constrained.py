"""Constrained answers for the coordinator model: free reasoning, then JSON that matches a schema (llguidance).

Why llguidance: it compiles a JSON schema into a token mask for any Hugging Face fast tokenizer (byte-level BPE
included) in milliseconds, computes each mask in well under a millisecond on the CPU, and needs neither torch.compile
nor a GPU (its ``llguidance.torch`` helpers use torch.compile; this module applies the mask with numpy instead).

A request's answer is generated in phases:
  1. thinking (reasoning models only): free sampling until the model writes ``</think>``; when the thinking budget
     (``max_tokens - answer_reserve``) is spent, ``</think>`` is forced, so reasoning can never eat the answer;
  2. answer: every token is sampled from the tokens the grammar allows (llguidance mask);
  3. closing: when at most ``close_margin`` tokens are left, the token that closes the most (``"`` ``]`` ``}``
     ``,`` ``:`` only) is taken whenever the grammar allows one, so the JSON closes before ``max_tokens``.
A model without a reasoning channel starts in the answer phase. The answer ends as soon as the JSON is complete.
"""

from __future__ import annotations

import json
import threading

import numpy as np

CLOSERS = frozenset('"]},: \n')
# Compact JSON: no free whitespace between tokens (a model with random weights would spend its budget on it, and
# a real one gains nothing from it), "," and ":" as separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class Grammars:
    """One checkpoint's llguidance tokenizer and the grammars compiled for it, cached by schema text."""

    def __init__(self, tokenizer, vocab_limit: int) -> None:
        self._hf = tokenizer
        self._vocab_limit = vocab_limit
        self._lock = threading.Lock()
        self._lltok = None
        self._grammars: dict[str, str] = {}

    def _tokenizer(self):
        import llguidance.hf

        if self._lltok is None:
            self._lltok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_limit)
        return self._lltok

    def matcher(self, schema_text: str):
        """A fresh matcher for one request. ValueError (the request's fault) for a schema that does not compile."""
        try:
            import llguidance
        except ImportError as exc:  # pragma: no cover - llguidance is a dependency of the package
            raise RuntimeError(f"constrained decoding needs llguidance: {exc}") from None
        with self._lock:
            tokenizer = self._tokenizer()
            grammar = self._grammars.get(schema_text)
            if grammar is None:
                try:
                    schema = json.loads(schema_text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"json_schema is not JSON: {exc}") from None
                if not isinstance(schema, dict):
                    raise ValueError("json_schema must be a JSON object")
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
                error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
                if error:
                    raise ValueError(f"json_schema cannot be used for constrained decoding: {error[:300]}")
                if len(self._grammars) > 32:
                    self._grammars.clear()
                self._grammars[schema_text] = grammar
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"json_schema cannot be used for constrained decoding: {matcher.get_error()[:300]}")
        return matcher


def closing_scores(token_bytes, vocab: int) -> np.ndarray:
    """Two rows of per-token scores, built once per checkpoint so that the closing phase is one vectorised argmax:
    row 0 (inside a string): tokens that begin with ``"`` and hold only closing characters, scored by how much they
    close (a ``,`` or ``:`` after the quote lowers the score: it opens another member); row 1 (outside strings): tokens made only of ``]`` and ``}``, scored by their length. 0: not a closer."""
    scores = np.zeros((2, vocab), dtype=np.int32)
    for token in range(vocab):
        data = token_bytes(token)
        if not data:
            continue
        text = data.decode("utf-8", errors="replace")
        if text.startswith('"') and set(text) <= CLOSERS:
            # a separator after the quote opens another member: it closes nothing, so it costs
            scores[0, token] = max(1, 2 + 4 * sum(ch in '"]}' for ch in text) - 3 * sum(ch in ",:" for ch in text))
        if set(text) <= set("]}"):
            scores[1, token] = len(text)
    return scores


def shortest_answer(matcher, closing_scores: np.ndarray, token_bytes, limit: int = 1024) -> int:
    """Tokens of the shortest answer this closing policy writes from the start (grammar-forced tokens, closers, else
    the first allowed token): the closing phase must begin at least this many tokens before ``max_tokens``, since
    closing from inside the answer can need as much (required keys are spelled out token by token)."""
    probe = AnswerConstraint(matcher, think_close_ids=None, max_tokens=limit, answer_reserve=limit,
                             close_margin=limit, closing_scores=closing_scores, token_bytes=token_bytes)
    for produced in range(limit):
        mask = probe.allowed(closing_scores.shape[-1])
        if mask is None or not mask.any():
            break
        choice = probe.closing_choice(mask, produced)
        token = choice if choice is not None else int(np.flatnonzero(mask)[0])
        if not probe.advance(token) or probe.complete:
            return produced + 1
    return limit


class AnswerConstraint:
    """One request's phase (thinking / answer) and grammar state; see the module docstring."""

    def __init__(self, matcher, *, think_close_ids: list[int] | None, max_tokens: int, answer_reserve: int,
                 close_margin: int, closing_scores: np.ndarray,
                 token_bytes) -> None:
        self._matcher = matcher
        self._close_ids = list(think_close_ids or [])
        self.thinking = bool(self._close_ids)
        reserve = min(answer_reserve, max(0, max_tokens - len(self._close_ids)))
        self.think_budget = max(0, max_tokens - reserve - len(self._close_ids))
        self._max_tokens = max_tokens
        self._close_margin = close_margin
        self._closing_scores = closing_scores
        self._token_bytes = token_bytes
        self._in_string = False
        self._escaped = False
        self._recent: list[int] = []
        self._forcing = 0
        self.answer_tokens = 0

    @property
    def complete(self) -> bool:
        """The JSON answer is whole (the grammar accepts and nothing may follow but the end)."""
        return not self.thinking and (self._matcher.is_stopped() or self._matcher.is_accepting())

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""

    def forced(self, produced: int) -> int | None:
        """The token the loop must emit now (the next token of ``</think>`` once the thinking budget is spent)."""
        if not self.thinking or (not self._forcing and produced < self.think_budget):
            return None
        return self._close_ids[self._forcing]

    def allowed(self, vocab: int) -> np.ndarray | None:
        """Boolean mask over ``vocab`` logits of the tokens the grammar allows next; None while thinking freely."""
        if self.thinking:
            return None
        bias = np.frombuffer(self._matcher.compute_logit_bias(), dtype=np.uint8)
        mask = np.zeros(vocab, dtype=bool)
        n = min(vocab, bias.size)
        mask[:n] = bias[:n] > 0
        return mask

    def closing_choice(self, mask: np.ndarray, produced: int) -> int | None:
        """In the last ``close_margin`` tokens: the allowed token that closes the most (the open string, else open
        arrays and objects), so that the JSON ends within ``max_tokens``; None when no closer is allowed (the
        model's choice stands, e.g. for a required value still missing)."""
        if self._max_tokens - produced > self._close_margin:
            return None
        row = self._closing_scores[0 if self._in_string else 1]
        n = min(mask.size, row.size)
        scores = np.where(mask[:n], row[:n], 0)
        best = int(np.argmax(scores))
        return best if scores[best] > 0 else None

    def advance(self, token: int, forced: bool = False) -> bool:
        """Record an emitted token; False when the grammar refused it (should not happen: the mask allowed it)."""
        if self.thinking:
            self._forcing = self._forcing + 1 if forced else 0
            self._recent = (self._recent + [token])[-len(self._close_ids):]
            if self._forcing >= len(self._close_ids) or self._recent == self._close_ids:
                self.thinking = False
            return True
        self.answer_tokens += 1
        self._track_strings(self._token_bytes(token))
        return bool(self._matcher.consume_token(token))

    def _track_strings(self, data: bytes) -> None:
        """Whether the answer is inside a JSON string now (quotes and backslash escapes), for the closing phase."""
        for byte in data:
            if self._escaped:
                self._escaped = False
            elif self._in_string and byte == 0x5C:  # backslash
                self._escaped = True
            elif byte == 0x22:  # quote
                self._in_string = not self._in_string
