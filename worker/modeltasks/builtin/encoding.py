"""Text to token ids exactly as lm-evaluation-harness's `HFLM` (lm-eval 0.4.13) makes them.

The rules, with where HFLM has them (`lm_eval/models/huggingface.py`, `lm_eval/api/model.py`):

* `prefix_token_id`: the tokenizer's BOS id, else its EOS id (`HFLM.prefix_token_id`).
* `tok_encode`: the tokenizer's own special tokens (BOS as the tokenizer decides), none when
  the text already starts with the prefix token's text (`HFLM.tok_encode`).
* a [context, continuation] pair: the context's trailing whitespace moves to the
  continuation, context + continuation are encoded together and split at the length of the
  context's encoding (`TemplateLM._encode_pair`); an empty context becomes the prefix token,
  unless the continuation starts with it (`TemplateLM.loglikelihood`).
* the model's length: `n_positions`, `max_position_embeddings` or `n_ctx` of the (text)
  config, else the tokenizer's `model_max_length`, else 2048 (`resolve_max_length`); an input
  over it keeps its last tokens (`HFLM._loglikelihood_tokens`).
* rolling windows: `lm_eval.utils.get_rolling_token_windows` with `context_len=1`, made
  disjoint (`HFLM.loglikelihood_rolling`): every token of a document scored once.

No torch here, and no lm_eval: the worker does not need the eval extra.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_LENGTH = 2048  # lm_eval.models.utils.DEFAULT_MAX_LENGTH
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length
LENGTH_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass(frozen=True)
class Window:
    """One forward pass's worth of a request: the input ids (at most the model's length) and
    the continuation ids scored at its last positions; `item` is the request it belongs to."""

    ids: tuple[int, ...]
    continuation: tuple[int, ...]
    item: int


def model_max_length(model: Any, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input the model takes, found as HFLM finds it."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in LENGTH_ATTRIBUTES:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


class HarnessTokens:
    """A tokenizer used the way HFLM uses it (see the module docstring)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        prefix = bos if bos is not None else eos
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to put before an empty "
                             "context: save one with the tokenizer")
        self.prefix_token_id = int(prefix)
        self._prefix_text = str(tokenizer.decode(self.prefix_token_id))

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """`HFLM.tok_encode`: the tokenizer's own special tokens unless told, none before a
        text that starts with the prefix token's text."""
        options: dict[str, bool] = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self._prefix_text and text.startswith(self._prefix_text):
            options["add_special_tokens"] = False
        return [int(i) for i in self.tokenizer.encode(text, **options)]

    def encode_prompt(self, text: str) -> list[int]:
        """A generation prompt as `HFLM.tok_batch_encode` encodes it (no special tokens before a
        text that starts with the BOS token's text)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        return [int(i) for i in self.tokenizer.encode(text)]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) of a pair, empty context included."""
        if context == "":
            ids = self.encode(continuation, add_special_tokens=False)
            if not ids:
                return [self.prefix_token_id], []
            if ids[0] != self.prefix_token_id:
                return [self.prefix_token_id], ids
            return ids[:1], ids[1:]
        spaces = len(context) - len(context.rstrip())
        if spaces > 0:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    def window(self, context: list[int], continuation: list[int], item: int) -> Window:
        """The pair as one input: left-truncated to the model's length, its last token dropped."""
        ids = (context + continuation)[-(self.max_length + 1):][:-1]
        return Window(tuple(ids), tuple(continuation), item)

    def rolling(self, text: str, item: int) -> Iterator[Window]:
        """HFLM's disjoint rolling windows over the document `text` (none for an empty one)."""
        tokens = self.encode(text)
        if not tokens:
            return
        first = min(self.max_length, len(tokens))
        yield self._disjoint([self.prefix_token_id] + tokens[:first - 1], tokens[:first], item)
        done = first
        while done < len(tokens):
            length = min(len(tokens) - done, self.max_length)
            end = done + length
            yield self._disjoint(tokens[end - self.max_length - 1:end - 1], tokens[end - length:end], item)
            done += length

    def _disjoint(self, context: list[int], predicted: list[int], item: int) -> Window:
        """`lm_eval.utils.make_disjoint_window`, then the window as `_loglikelihood_tokens` feeds it."""
        return self.window(context[:len(context) - (len(predicted) - 1)], predicted, item)
