"""ppzoo.data: reading text, JSONL, Parquet and saved datasets; chat labels; packing; resumable batches."""

import json
import sys

import pytest
import torch

from ppzoo.data import Document, PackedData, Tokenizer, check_data_source, load_data, pack, read_records
from ppzoo.loss import IGNORE_INDEX

CHAT = [
    {"role": "user", "content": "what splits the model"},
    {"role": "assistant", "content": "the pipeline splits the model"},
    {"role": "user", "content": "and then"},
    {"role": "assistant", "content": "each rank runs its stage"},
]
#: a Jinja chat template in the common shape: a header per turn, the content, an end marker
TEMPLATE = (
    "{% for m in messages %}<start> {{ m['role'] }} {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<start> assistant {% endif %}"
)


def _word_tokenizer(directory, words, *, template=None):
    """A fast word-level tokenizer saved as a checkpoint ships it (tokenizer.json + config)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<end>")
    if template:
        fast.chat_template = template
    fast.save_pretrained(directory)
    return directory


def _words(*texts):
    return sorted({w for t in texts for w in t.split()} | {"<start>", "<end>", "user", "assistant"})


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _documents(packed):
    """The documents of packed data, rebuilt from position restarts (pieces of a long one joined)."""
    flat_ids = packed.input_ids.reshape(-1).tolist()
    flat_pos = packed.position_ids.reshape(-1).tolist()
    seq_len = packed.input_ids.shape[1]
    docs, current = [], []
    for i, (token, pos) in enumerate(zip(flat_ids, flat_pos)):
        if pos == 0 and i % seq_len != 0 and current:  # a restart inside a row: a new document
            docs.append(current)
            current = []
        current.append(token)
    docs.append(current)
    return docs


# -- packing -------------------------------------------------------------------------------------
def test_position_ids_restart_at_documents_and_sequences():
    lengths = [5, 11, 3, 7]
    docs = [
        Document(list(range(100 * d, 100 * d + n)), list(range(100 * d, 100 * d + n))) for d, n in enumerate(lengths)
    ]
    packed = pack(docs, seq_len=8)
    assert packed.input_ids.shape == (4, 8)  # 26 tokens, padded to 32
    ids, pos, labels = (t.reshape(-1).tolist() for t in (packed.input_ids, packed.position_ids, packed.labels))
    starts = [0, 5, 16, 19]
    for i in range(len(ids)):
        doc_start = max(s for s in starts if s <= i) if i < 26 else 26
        row_start = i - i % 8
        # position = distance to the latest document start or row start
        assert pos[i] == i - max(doc_start, row_start), i
    # a document's first token is not a target; the others are their own ids; padding never is
    for i in range(26):
        assert labels[i] == (IGNORE_INDEX if i in starts else ids[i])
    assert labels[26:] == [IGNORE_INDEX] * 6
    assert packed.documents == 4
    assert packed.tokens == 26 - 4


def test_pack_refuses_nothing_to_learn():
    with pytest.raises(ValueError, match="no text"):
        pack([], seq_len=8)
    with pytest.raises(ValueError, match="no token to learn"):
        pack([Document([1, 2, 3], [IGNORE_INDEX] * 3)], seq_len=8)


# -- batches: deterministic, by index ----------------------------------------------------------
def _numbered(rows, seq_len=4):
    ids = torch.arange(rows * seq_len).view(rows, seq_len)
    return PackedData(ids, ids.clone(), torch.arange(seq_len).expand(rows, seq_len).clone(), documents=rows)


def test_every_epoch_sees_every_row_once_in_its_own_order():
    data = _numbered(10)
    stream = torch.cat([data.batch(i, 5, seed=3)["input_ids"][:, 0] // 4 for i in range(6)]).tolist()
    epochs = [stream[0:10], stream[10:20], stream[20:30]]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # batches cross epoch ends: size 3 over 10 rows gives the same stream
    assert torch.cat([data.batch(i, 3, seed=3)["input_ids"][:, 0] // 4 for i in range(10)]).tolist() == stream


def test_a_batch_depends_on_its_index_alone():
    data = _numbered(7)
    straight = [data.batch(i, 4, seed=1) for i in range(8)]
    # a resumed run asks for batch 5 first: it gets what the uninterrupted run got
    again = PackedData(data.input_ids, data.labels, data.position_ids, data.documents)
    for i in (5, 2, 7):
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(again.batch(i, 4, seed=1)[key], straight[i][key])
    assert not torch.equal(data.batch(0, 4, seed=2)["input_ids"], straight[0]["input_ids"])
    # no seed: file order
    assert data.batch(1, 3, seed=None)["input_ids"][:, 0].tolist() == [12, 16, 20]


def test_save_and_load(tmp_path):
    data = _numbered(3)
    data.save(tmp_path / "d.pt")
    back = PackedData.load(tmp_path / "d.pt")
    assert torch.equal(back.input_ids, data.input_ids) and back.documents == 3


# -- sources -------------------------------------------------------------------------------------
def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo world\n\nsecond paragraph", encoding="utf-8")
    packed = load_data(path, Tokenizer(tmp_path, vocab_size=256), seq_len=8)
    assert packed.documents == 1
    assert packed.input_ids.reshape(-1).tolist()[: len(path.read_bytes())] == list(path.read_bytes())


def test_jsonl_text_records_are_documents(tmp_path):
    texts = ["first document", "a second, longer document than the first", "third"]
    path = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    packed = load_data(path, Tokenizer(tmp_path, vocab_size=256), seq_len=16)
    assert packed.documents == 3
    joined = "".join(texts).encode()
    docs = _documents(packed)
    # restarts inside rows fall exactly on the documents' boundaries (plus the padding's)
    assert bytes(sum(docs, [])[: len(joined)]) == joined
    boundaries = [len(texts[0]), len(texts[0]) + len(texts[1])]
    flat_pos = packed.position_ids.reshape(-1)
    for b in boundaries:
        assert flat_pos[b] == 0


def test_jsonl_with_tokenizer_appends_eos(tmp_path):
    texts = ["the pipeline splits the model", "each rank runs its stage"]
    _word_tokenizer(tmp_path, _words(*texts))
    tokenizer = Tokenizer(tmp_path, vocab_size=64)
    packed = load_data(_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts]), tokenizer, seq_len=32)
    eos = tokenizer.hf.eos_token_id
    expected = []
    for t in texts:
        expected += tokenizer.hf(t, add_special_tokens=False)["input_ids"] + [eos]
    assert packed.input_ids.reshape(-1).tolist()[: len(expected)] == expected
    assert packed.position_ids.reshape(-1).tolist()[: len(expected)] == list(range(6)) + list(range(6))


def test_chat_labels_only_assistant_tokens_with_a_chat_template(tmp_path):
    _word_tokenizer(tmp_path, _words(*(m["content"] for m in CHAT)), template=TEMPLATE)
    tokenizer = Tokenizer(tmp_path, vocab_size=64)
    doc = tokenizer.document({"messages": CHAT}, "record 1")
    hf = tokenizer.hf
    assert doc.input_ids == hf(hf.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    learnt = [hf.convert_ids_to_tokens(t) for t, label in zip(doc.input_ids, doc.labels) if label != IGNORE_INDEX]
    # each assistant turn's content and end marker, nothing of the user's turns or the headers
    assert learnt == "the pipeline splits the model <end> each rank runs its stage <end>".split()
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(doc.input_ids, doc.labels))


def test_chat_without_template_is_refused(tmp_path):
    _word_tokenizer(tmp_path, _words(*(m["content"] for m in CHAT)))
    with pytest.raises(ValueError, match="has no chat template"):
        Tokenizer(tmp_path, vocab_size=64).document({"messages": CHAT}, "record 1")


def test_chat_in_bytes_learns_the_assistant_lines(tmp_path):
    doc = Tokenizer(tmp_path, vocab_size=256).document({"messages": CHAT}, "record 1")
    text = bytes(doc.input_ids).decode()
    assert text == "".join(f"{m['role']}: {m['content']}\n" for m in CHAT)
    learnt = bytes(t for t, label in zip(doc.input_ids, doc.labels) if label != IGNORE_INDEX).decode()
    assert learnt == "the pipeline splits the model\neach rank runs its stage\n"


def test_chat_records_pack_with_masked_labels(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    packed = load_data(path, Tokenizer(tmp_path, vocab_size=256), seq_len=64)
    assert packed.documents == 2
    learnt = bytes(packed.labels[packed.labels != IGNORE_INDEX].tolist()).decode()
    assert learnt == "the pipeline splits the model\neach rank runs its stage\nthe pipeline splits the model\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ('{"text": "a"}\nnot json\n', "line 2: not JSON"),
        ('{"title": "a"}\n', "record 1 has neither a 'text' string nor 'messages' (its fields: title)"),
        ("[1, 2]\n", "line 1: a JSON list, expected an object"),
        ('{"messages": [{"role": "user"}]}\n', "'messages' must be a list of"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "holds no token to learn"),
        ("\n\n", "holds no text"),
    ],
)
def test_bad_jsonl_is_refused(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="--data") as info:
        load_data(path, Tokenizer(tmp_path, vocab_size=256), seq_len=8)
    assert message in str(info.value)


def test_missing_source(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        check_data_source(tmp_path / "nope.txt", "--eval-data")


def test_parquet_without_pyarrow_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"needs the pyarrow package: pip install pyarrow"):
        check_data_source(tmp_path / "d.parquet")


def test_datasets_dir_without_datasets_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"needs the datasets package: pip install datasets"):
        check_data_source(tmp_path)


def test_parquet_rows_are_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = ["first document", "second one"]
    pq.write_table(pa.table({"text": texts, "id": [1, 2]}), tmp_path / "d.parquet")
    assert [r["text"] for r in read_records(tmp_path / "d.parquet")] == texts
    packed = load_data(tmp_path / "d.parquet", Tokenizer(tmp_path, vocab_size=256), seq_len=8)
    assert packed.documents == 2


def test_saved_datasets_are_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"messages": [CHAT]}).save_to_disk(tmp_path / "ds")
    packed = load_data(tmp_path / "ds", Tokenizer(tmp_path, vocab_size=256), seq_len=64)
    assert packed.documents == 1 and packed.tokens > 0


def test_tokenizer_outside_the_vocab_is_refused(tmp_path):
    text = "the pipeline splits the model"
    _word_tokenizer(tmp_path, _words(text))
    path = tmp_path / "d.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"gives token id \d+, outside the model's vocab_size 4"):
        load_data(path, Tokenizer(tmp_path, vocab_size=4), seq_len=8)
