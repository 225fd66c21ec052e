"""Text generation on a loaded model: prefill, then one token at a time with the KV cache.

- `Sampling`: greedy (temperature 0, the default), or temperature / top-k / top-p sampling drawn
  from a numpy Generator seeded by `seed` (same seed, same text).
- `generate`: the whole continuation (`Generation`: ids, text, why it stopped).
- `stream`: a Python generator of text pieces, decoded incrementally; a byte-level BPE token can
  end in the middle of a UTF-8 character, so a piece is held back until its character is complete.
  `"".join(stream(...))` equals `generate(...).text`.
- The KV cache stays in place across steps where the model allows it (`kvcache`), else it is
  copied every step (`Model.forward`); both give the same logits.
- `full_recompute=True` runs the whole sequence through the model at every step instead of using
  the cache: slow, only for checking that the cache gives the same result.

Generation stops at an eos token (not included in the output), after `max_new_tokens`, or when the
sequence reaches the model's context length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import BadArgument, RuntimeFailure, check_text
from .kvcache import SHARED
from .session import KVCache, Model


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy (top_k, top_p and seed are unused)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    seed: int | None = None  # None: fresh entropy every call

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise BadArgument(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise BadArgument(f"top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BadArgument(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise BadArgument(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


class Sampler:
    """Picks tokens from logits according to a `Sampling`, with its own seeded numpy Generator."""

    def __init__(self, sampling: Sampling = GREEDY) -> None:
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for one position's logits [V]."""
        s = self.sampling
        logits = np.asarray(logits, dtype=np.float64)
        if s.greedy:
            return int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")  # best first; ties keep the lower id first, as argmax
        if 0 < s.top_k < order.size:
            order = order[: s.top_k]
        scaled = logits[order] / s.temperature
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if s.top_p < 1:
            # the smallest prefix whose probability reaches top_p (at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), s.top_p, side="left")) + 1
            order, probs = order[:keep], probs[:keep]
        cumulative = np.cumsum(probs)
        pick = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(order[min(pick, order.size - 1)])


class Decoder:
    """One sequence's decoding state: the tokens so far and their KV cache, kept in place where the
    model allows it (`Model.kv_cache` ``shared``: `kvcache.SharedCache`), else copied every step."""

    def __init__(self, model: Model, full_recompute: bool = False) -> None:
        self.model = model
        self.full_recompute = full_recompute
        self.tokens: list[int] = []
        self.cache: KVCache | None = None
        self.shared = model.shared_cache() if model.kv_cache == SHARED and not full_recompute else None

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Run the prompt; the logits [V] of its last position."""
        if not ids:
            raise RuntimeFailure("the prompt has no tokens")
        self.tokens = [int(i) for i in ids]
        prompt = np.array([self.tokens], dtype=np.int64)
        if self.shared is not None:
            self.shared.reset()
            return self.shared.run(prompt, last_only=True)[0, -1]
        logits, self.cache = self.model.forward(prompt, last_only=True)
        return logits[0, -1]

    def step(self, token: int) -> np.ndarray:
        """Append `token`; the logits [V] of the next position."""
        self.tokens.append(int(token))
        if self.full_recompute:
            logits, self.cache = self.model.forward(np.array([self.tokens], dtype=np.int64), last_only=True)
        elif self.shared is not None:
            logits = self.shared.run(np.array([[int(token)]], dtype=np.int64), last_only=True)
        else:
            logits, self.cache = self.model.forward(np.array([[int(token)]], dtype=np.int64), self.cache,
                                                    last_only=True)
        return logits[0, -1]


@dataclass
class Generation:
    """A finished continuation."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "eos", "length" (max_new_tokens) or "context" (model's context full)


def prompt_ids(model: Model, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt (text, or ids as they are). An empty prompt starts from the eos token,
    which ends every training document, i.e. a fresh document begins."""
    ids = model.encode(check_text(prompt, "the prompt")) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        if not model.eos_ids:
            raise RuntimeFailure("the prompt is empty and the model has no eos token to start from")
        ids = [model.eos_ids[0]]
    if model.context_length and len(ids) > model.context_length:
        raise BadArgument(f"the prompt is {len(ids)} tokens; the model's context is {model.context_length}")
    return ids


def iter_tokens(model: Model, ids: Sequence[int], max_new_tokens: int, sampling: Sampling = GREEDY,
                stop_at_eos: bool = True, full_recompute: bool = False,
                result: Generation | None = None) -> Iterator[int]:
    """Yield the new token ids one by one (eos excluded); `result`, if given, receives them and
    the finish reason."""
    if max_new_tokens < 0:
        raise BadArgument(f"max-new-tokens must be >= 0, got {max_new_tokens}")
    result = result if result is not None else Generation(list(ids))
    budget = max_new_tokens
    if model.context_length:
        budget = min(budget, model.context_length - len(ids))
    reason = "length" if budget == max_new_tokens else "context"
    if budget <= 0:
        result.finish_reason = reason
        return
    sample = Sampler(sampling)
    decoder = Decoder(model, full_recompute=full_recompute)
    eos = set(model.eos_ids) if stop_at_eos else set()
    logits = decoder.prefill(ids)
    for n in range(budget):
        token = sample(logits)
        if token in eos:
            result.finish_reason = "eos"
            return
        result.token_ids.append(token)
        yield token
        if n + 1 < budget:  # the last token needs no forward pass
            logits = decoder.step(token)
    result.finish_reason = reason


def generate(model: Model, prompt: str | Sequence[int], max_new_tokens: int = 64,
             sampling: Sampling = GREEDY, stop_at_eos: bool = True, full_recompute: bool = False) -> Generation:
    """The continuation of `prompt` (text or token ids)."""
    result = Generation(prompt_ids(model, prompt))
    for _ in iter_tokens(model, result.prompt_ids, max_new_tokens, sampling, stop_at_eos, full_recompute, result):
        pass
    result.text = model.decode(result.token_ids)
    return result


class TextStream:
    """Turns token ids into text pieces as they arrive, never splitting a UTF-8 character.

    Byte-level BPE decodes a window of tokens to bytes, then to text; while the window ends in an
    incomplete character the text ends in U+FFFD, and the piece waits for the next token. The window
    restarts after each emitted piece, so the cost per token stays constant.
    """

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - tokenizers.Tokenizer
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the tokens of the previous piece (context for the decoder)
        self.read = 0  # tokens up to here are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; the text it completes ("" while a character is unfinished)."""
        self.ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read >= len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


def stream(model: Model, prompt: str | Sequence[int], max_new_tokens: int = 64, sampling: Sampling = GREEDY,
           stop_at_eos: bool = True, full_recompute: bool = False,
           result: Generation | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as each is complete.

    `result`, if given, is filled with the prompt ids, token ids, full text and finish reason."""
    result = result if result is not None else Generation([])
    result.prompt_ids = prompt_ids(model, prompt)
    pieces = TextStream(model.tokenizer)
    for token in iter_tokens(model, result.prompt_ids, max_new_tokens, sampling, stop_at_eos,
                             full_recompute, result):
        piece = pieces.push(token)
        if piece:
            yield piece
    tail = pieces.flush()
    if tail:
        yield tail
    result.text = model.decode(result.token_ids)
