"""Training data: documents read from a file, tokenised, packed into fixed-length sequences.

Four sources, told apart by the path:

- a directory: a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (needs ``datasets``);
- ``*.jsonl`` / ``*.json``: one JSON object a line;
- ``*.parquet``: a Parquet table (needs ``pyarrow``);
- anything else: UTF-8 text, the whole file one document.

A record (a JSON line, a table row) is a document: ``{"text": ...}``, or a chat
``{"messages": [{"role": ..., "content": ...}, ...]}``. A chat is rendered with the tokenizer's
chat template and only the assistant's tokens are learnt (every other label is ``-100``). A model
without a tokenizer gets one token per UTF-8 byte, and chats are rendered as ``role: content``
lines, the assistant's content and newline learnt.

Documents are concatenated and cut into ``seq_len`` sequences (the last one padded, its padding
never learnt). ``position_ids`` restart at every document start and every sequence start, so a
model sees each document, or each piece of one, from position 0; Hugging Face's masks read the
restarts as packed sequences and keep documents from attending to each other. The first token of a
document is never a target: it is not predicted from the document before it.

:class:`PackedData` hands out batches by index (a seeded shuffle per epoch), so the batch of any
step is known without replaying the ones before it: a resumed run sees exactly the batches the
uninterrupted run would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ppzoo.loss import IGNORE_INDEX

__all__ = [
    "Document",
    "PackedData",
    "Tokenizer",
    "check_data_source",
    "data_format",
    "load_data",
    "pack",
    "read_records",
]

#: files whose presence says a checkpoint ships a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
#: the optional package each source needs, and the extra that installs it
_NEEDS = {"parquet": ("pyarrow", "ppzoo[data]"), "datasets": ("datasets", "ppzoo[data]")}


@dataclass(frozen=True)
class Document:
    """One document's token ids and labels (``-100`` where nothing is learnt)."""

    input_ids: list[int]
    labels: list[int]


def data_format(path: str | os.PathLike) -> str:
    """``"datasets"``, ``"jsonl"``, ``"parquet"`` or ``"text"``: how ``path`` is read."""
    path = Path(path)
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    return "text"


def check_data_source(path: str | os.PathLike, flag: str = "--data") -> str:
    """Refuse a source that cannot be read, before anything is tokenised; returns its format.

    Raises:
        ValueError: no such file or directory, an empty file, or the package it needs is missing.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{flag} {str(path)!r}: no such file or directory; pass a text, .jsonl or .parquet file, "
            "or a directory saved by datasets' save_to_disk"
        )
    kind = data_format(path)
    if kind in _NEEDS:
        module, extra = _NEEDS[kind]
        try:
            __import__(module)
        except ImportError:
            raise ValueError(
                f"{flag} {str(path)!r} is {'a Parquet file' if kind == 'parquet' else 'a directory (a saved datasets dataset)'}, "
                f"which needs the {module} package: pip install {module} (or {extra!r})"
            ) from None
    if kind != "datasets" and path.stat().st_size == 0:
        raise ValueError(f"{flag} {str(path)!r} is empty; pass a file with text to train on")
    return kind


def read_records(path: str | os.PathLike, *, name: str | None = None) -> Iterator[str | dict[str, Any]]:
    """The documents of ``path``: strings (plain text) or records (dicts with ``text`` or ``messages``).

    ``name`` is how messages call the source (default: the path).

    Raises:
        ValueError: text that is not UTF-8, a line that is not a JSON object, a dataset with
            several splits.
    """
    path = Path(path)
    name = name or str(path)
    kind = data_format(path)
    if kind == "text":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is not UTF-8 text ({exc}); pass a UTF-8 text file") from exc
    elif kind == "jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}, line {number}: not JSON ({exc}); write one JSON object a line") from exc
                if not isinstance(record, dict):
                    raise ValueError(f"{name}, line {number}: a JSON {type(record).__name__}, expected an object")
                yield record
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    else:
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            if "train" not in dataset:
                raise ValueError(
                    f"{name} holds the splits {', '.join(dataset)} and none is 'train'; "
                    "save the one split to train on (dataset['name'].save_to_disk(...))"
                )
            dataset = dataset["train"]
        yield from dataset


class Tokenizer:
    """The model's tokenizer, or one token per UTF-8 byte for a model that ships none.

    Args:
        model_dir: the local model directory.
        vocab_size: the model's vocabulary size (ids are checked against it).

    Raises:
        ValueError: the tokenizer fails to load, or there is none and the vocabulary is smaller
            than 256.
    """

    def __init__(self, model_dir: str | os.PathLike, *, vocab_size: int):
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.hf: Any = None
        if any((self.model_dir / name).is_file() for name in TOKENIZER_FILES):
            import sys

            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(self.model_dir)
            except Exception as exc:  # noqa: BLE001 - any failure is reported with the directory
                raise ValueError(f"cannot load the tokenizer in {str(self.model_dir)!r}: {exc}") from exc
            # NOTE: documents are cut into sequences later; the model's length limit does not
            # apply to tokenising them, and the warning it would print is noise.
            self.hf.model_max_length = sys.maxsize
        elif vocab_size < 256:
            raise ValueError(
                f"{str(self.model_dir)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) and its vocab_size "
                f"{vocab_size} is too small for byte tokens (256); add the model's tokenizer to the directory "
                "or use a model with a vocabulary of at least 256"
            )

    @property
    def kind(self) -> str:
        """``"tokenizer"`` or ``"byte"``."""
        return "byte" if self.hf is None else "tokenizer"

    def encode(self, text: str) -> list[int]:
        if self.hf is None:
            return list(text.encode("utf-8"))
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def text(self, text: str) -> Document:
        """A text document: every token learnt, the tokenizer's end-of-sequence token appended."""
        ids = self.encode(text)
        eos = None if self.hf is None else self.hf.eos_token_id
        if ids and eos is not None:
            ids.append(int(eos))
        return Document(ids, list(ids))

    def chat(self, messages: list[dict[str, Any]]) -> Document:
        """A chat: rendered with the chat template; labels only on the assistant's tokens."""
        if self.hf is None:
            ids: list[int] = []
            labels: list[int] = []
            for message in messages:
                head, body = f"{message['role']}: ".encode(), f"{message['content']}\n".encode()
                ids += list(head) + list(body)
                learnt = message["role"] == "assistant"
                labels += [IGNORE_INDEX] * len(head) + (list(body) if learnt else [IGNORE_INDEX] * len(body))
            return Document(ids, labels)
        if not getattr(self.hf, "chat_template", None):
            raise ValueError(
                f"the tokenizer in {str(self.model_dir)!r} has no chat template; "
                "add one to tokenizer_config.json or give records a 'text' field instead of 'messages'"
            )
        if not self.hf.is_fast:
            raise ValueError(
                f"the tokenizer in {str(self.model_dir)!r} is a slow tokenizer; chats need a fast one "
                "(tokenizer.json) to find the assistant's tokens"
            )
        render = self.hf.apply_chat_template
        full = render(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[: i + 1], tokenize=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(
                    f"the chat template of {str(self.model_dir)!r} renders a conversation differently from "
                    "its beginning, so the assistant's tokens cannot be found; use 'text' records"
                )
            spans.append((len(before), len(upto)))
        encoded = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [
            token if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for token, (start, _) in zip(ids, encoded["offset_mapping"])
        ]
        return Document(ids, labels)

    def document(self, record: str | dict[str, Any], where: str) -> Document:
        """A record (a string, or a dict with ``text`` or ``messages``) as a document."""
        if isinstance(record, str):
            return self.text(record)
        if "messages" in record and record["messages"] is not None:
            messages = record["messages"]
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
            return self.chat(messages)
        if isinstance(record.get("text"), str):
            return self.text(record["text"])
        raise ValueError(
            f"{where} has neither a 'text' string nor 'messages' (its fields: {', '.join(map(str, record)) or 'none'}); "
            "give every record one of them"
        )


def pack(documents: Iterable[Document], seq_len: int, *, pad_id: int = 0) -> PackedData:
    """Concatenate documents and cut them into ``seq_len`` sequences; the last is padded.

    Raises:
        ValueError: the documents hold no token to learn.
    """
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    count = 0
    for doc in documents:
        if not doc.input_ids:
            continue
        starts.append(len(ids))
        ids += doc.input_ids
        labels += doc.labels
        labels[starts[-1]] = IGNORE_INDEX  # NOTE: not predicted from the document before
        count += 1
    if not any(label != IGNORE_INDEX for label in labels):
        raise ValueError("no token to learn" if ids else "no text")
    rows = -(-len(ids) // seq_len)
    pad = rows * seq_len - len(ids)
    if pad:
        starts.append(len(ids))
        ids += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
    index = torch.arange(len(ids))
    start = torch.zeros(len(ids), dtype=torch.bool)
    start[torch.tensor(starts)] = True
    start[::seq_len] = True
    last_start = torch.where(start, index, 0).cummax(0).values
    return PackedData(
        input_ids=torch.tensor(ids, dtype=torch.long).view(rows, seq_len),
        labels=torch.tensor(labels, dtype=torch.long).view(rows, seq_len),
        position_ids=(index - last_start).view(rows, seq_len),
        documents=count,
    )


@dataclass
class PackedData:
    """Packed sequences ``(rows, seq_len)`` and the batches drawn from them.

    ``batch(index, size, seed=...)`` reads the sequence stream at positions
    ``index * size ... (index + 1) * size``; the stream is every row once per epoch, in a seeded
    order of its own for each epoch. The same arguments always give the same batch.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    documents: int
    _order_cache: tuple[Any, Any] = field(default=(None, None), repr=False, compare=False)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Tokens that are learnt (labels other than -100)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def order(self, epoch: int, *, seed: int) -> torch.Tensor:
        """The rows of ``epoch`` in their seeded order."""
        key = (seed, epoch)
        if self._order_cache[0] != key:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._order_cache = (key, torch.randperm(self.rows, generator=generator))
        return self._order_cache[1]

    def batch(self, index: int, size: int, *, seed: int | None) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``size`` sequences (``seed=None``: in file order, no shuffle).

        Returns:
            ``input_ids``, ``labels`` and ``position_ids``, each ``(size, seq_len)``.
        """
        positions = range(index * size, (index + 1) * size)
        rows = []
        for p in positions:
            epoch, i = divmod(p, self.rows)
            rows.append(i if seed is None else int(self.order(epoch, seed=seed)[i]))
        picked = torch.tensor(rows)
        return {
            "input_ids": self.input_ids[picked],
            "labels": self.labels[picked],
            "position_ids": self.position_ids[picked],
        }

    def save(self, path: str | os.PathLike) -> None:
        torch.save(
            {
                "input_ids": self.input_ids,
                "labels": self.labels,
                "position_ids": self.position_ids,
                "documents": self.documents,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> PackedData:
        return cls(**torch.load(path))


def load_data(path: str | os.PathLike, tokenizer: Tokenizer, *, seq_len: int, flag: str = "--data") -> PackedData:
    """Read, tokenise and pack ``path`` for ``tokenizer``'s model.

    Raises:
        ValueError: the source cannot be read, holds no text or no token to learn, has a record
            with neither ``text`` nor ``messages``, or gives ids outside the model's vocabulary.
    """
    check_data_source(path, flag)
    name = str(path)
    docs: list[Document] = []
    for number, record in enumerate(read_records(path, name=f"{flag} {name!r}"), 1):
        docs.append(tokenizer.document(record, f"{flag} {name!r}, record {number}"))
    try:
        packed = pack(docs, seq_len)
    except ValueError as exc:
        raise ValueError(
            f"{flag} {name!r} holds {exc} ({len(docs)} records); "
            + (
                "chat records need at least one assistant message"
                if "learn" in str(exc)
                else "pass a file with text to train on"
            )
        ) from None
    top = int(packed.input_ids.max())
    if top >= tokenizer.vocab_size:
        raise ValueError(
            f"the tokenizer in {str(tokenizer.model_dir)!r} gives token id {top}, outside the model's "
            f"vocab_size {tokenizer.vocab_size}; the tokenizer does not belong to this model"
        )
    return packed
