"""A step's inputs: token ids checked on every rank, and the batch every rank of a pipeline agrees on.

``check_tokens`` refuses ids outside the vocabulary; ``StepInputs``, a base of
:class:`ppzoo.runtime.Pipeline`, checks the batch ``step`` / ``eval`` are given and has every rank
agree on it before the schedule runs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ppzoo.agreement import check_same, exchange, tensor_digest
from ppzoo.loss import IGNORE_INDEX, count_label_tokens
from ppzoo.schedule import check_batch
from ppzoo.vision import TOKEN_IDS

__all__ = ["StepInputs", "check_tokens"]

#: where a rank's count of tokens to learn sits among the facts it tells the others (the last)
_TOKENS_FACT = 7


def check_tokens(tokens: torch.Tensor, name: str, *, vocab_size: int, ignore_index: int | None = None) -> None:
    """Refuse ``tokens`` that are not integer ids in ``[0, vocab_size)`` (or ``ignore_index``).

    Args:
        tokens: a ``(batch, sequence)`` tensor of token ids (``input_ids`` or ``labels``).
        name: what ``tokens`` is, for the message.
        vocab_size: the model's vocabulary size.
        ignore_index: a value allowed besides the ids (``-100`` for labels).

    Raises:
        ValueError: ``tokens`` is not an integer tensor, or holds an id out of range; the message
            names the first such value, its position (row, column) and the vocabulary size.
    """
    dtype = tokens.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of token ids, got dtype {dtype}; "
            f"tokenize to ids (torch.long) in [0, {vocab_size})"
        )
    bad = (tokens < 0) | (tokens >= vocab_size)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if not bool(bad.any()):
        return
    where = tuple(int(i) for i in bad.nonzero()[0])
    count = int(bad.sum())
    allowed = f"ids 0..{vocab_size - 1}" + (f" or {ignore_index} (ignored)" if ignore_index is not None else "")
    others = f" ({count - 1} more out of range)" if count > 1 else ""
    raise ValueError(
        f"{name}[{', '.join(map(str, where))}] is {int(tokens[where])}, outside the vocabulary of {vocab_size} "
        f"tokens{others}; {name} must hold {allowed}: check that the tokenizer is the model's"
    )


class StepInputs:
    """The checks of the batch :meth:`Pipeline.step` / :meth:`Pipeline.eval` are given, and its agreement across ranks.

    A base of :class:`ppzoo.runtime.Pipeline`, which supplies what these methods read: ``adapter``,
    ``config``, ``device``, ``microbatches``, ``holds_first``, the image plumbing
    (``_vision_language``, ``_image_batch``) and whose facts are compared (``_batch_groups``,
    ``_dp_peers``).
    """

    @property
    def _vocab_size(self) -> int:
        return int(self.adapter.text_config(self.config).vocab_size)

    def _inputs(self, input_ids, attention_mask, position_ids) -> tuple[tuple, dict]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        check_batch(batch_size=batch, microbatches=self.microbatches)
        # NOTE: every rank of a pipeline gets the same batch, so every rank refuses it here, before
        # any communication; an id out of range would otherwise fail on the first rank only (or
        # read past the embedding on a GPU) while its peers wait in the schedule.
        check_tokens(input_ids, "input_ids", vocab_size=self._vocab_size)
        kwargs = {}
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, seq):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq)}")
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if position_ids is not None:
            # NOTE: microbatching splits every kwarg along dim 0, so a shared (1, seq) row is expanded.
            kwargs["position_ids"] = position_ids.to(self.device).expand(batch, seq).contiguous()
        args = (input_ids.to(self.device),) if self.holds_first else ()
        return args, kwargs

    #: compare a hash of every rank's batch in each step / eval (see ``pipeline(check_batch=...)``)
    check_batch: bool = False

    def _agreed_inputs(
        self, what: str, input_ids, labels, attention_mask, position_ids, images: dict[str, Any] | None = None
    ) -> tuple[tuple, dict, int]:
        """This rank's checked inputs, once every rank has checked its own and they agree, and the
        global count of tokens to learn (this rank's labels' summed over its data-parallel peers).

        NOTE: a rank whose batch is refused still joins the exchange with its error, so its peers
        raise too instead of waiting in the schedule for it; ranks of one pipeline that pass
        different shapes (or, with ``check_batch``, different contents) are refused on every rank.
        The token count rides in the same exchange, so no collective of its own sums it over the
        data-parallel ranks.
        """
        error: Exception | None = None
        facts: list[int] = []
        try:
            args, kwargs = self._inputs(input_ids, attention_mask, position_ids)
            if self._vision_language:
                kwargs[TOKEN_IDS] = input_ids.to(self.device)
            if images:
                # NOTE: the vision tower runs here, before the exchange, so that a failure in it is
                # told to every rank instead of leaving them waiting in the schedule
                self._images = self._image_batch(
                    input_ids, attention_mask, images, train=labels is not None, positions=position_ids is None
                )
                kwargs.update(self._images.kwargs)
            tokens = 0
            if labels is not None:
                if tuple(labels.shape) != tuple(input_ids.shape):
                    raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
                check_tokens(labels, "labels", vocab_size=self._vocab_size, ignore_index=IGNORE_INDEX)
                tokens = count_label_tokens(labels)
            facts = [*input_ids.shape, labels is not None, attention_mask is not None, position_ids is not None]
            facts.append(tensor_digest(input_ids, labels, attention_mask, position_ids) if self.check_batch else 0)
            facts += [0] * (_TOKENS_FACT - len(facts)) + [tokens]
        except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here
            error = exc
        facts_seen = exchange(what, error, facts)

        def describe(v: list[int]) -> str:
            given = [n for n, f in zip(("labels", "attention_mask", "position_ids"), v[2:5], strict=True) if f]
            parts = [f"input_ids {(v[0], v[1])}", *given]
            return ", ".join(parts + ([f"content hash {v[5]:016x}"] if self.check_batch else []))

        # NOTE: the token count is not compared: without check_batch, ranks may pass different
        # labels of one shape, and each counts its own (summed over its data-parallel peers)
        check_same(facts_seen[:, :_TOKENS_FACT], self._batch_groups, what=what, describe=describe)
        self._check_length(input_ids.shape[1])
        return args, kwargs, int(facts_seen[self._dp_peers, _TOKENS_FACT].sum())

    #: whether this pipeline has warned of sequences longer than the model's positions
    _warned_length: bool = False

    def _check_length(self, seq_len: int) -> None:
        limit = getattr(self.adapter.text_config(self.config), "max_position_embeddings", None)
        if self._warned_length or not isinstance(limit, int) or seq_len <= limit:
            return
        self._warned_length = True
        warnings.warn(
            f"sequences of {seq_len} tokens are longer than the model's max_position_embeddings={limit}: the "
            "positions past it were never trained (and learned position embeddings have no entry for them); "
            f"cut or split the sequences to {limit} tokens at most. Warned once per pipeline",
            UserWarning,
            stacklevel=4,
        )
