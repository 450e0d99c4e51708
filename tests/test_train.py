"""``ppzoo train``: a short pipelined run, worker failures, option checks, and the tokenizer choice."""

import json
import math
import re

import pytest
import torch
from transformers import LlamaConfig

from ppzoo.architectures.llama import TINY
from ppzoo.cli import main
from ppzoo.train import BUILTIN_MODEL, load_tokens, sample_batch

TEXT = "the pipeline splits the model into stages, and each rank runs the stage it holds. " * 8
#: a run small enough for a test: two workers, a few tiny steps
SMALL = ["--steps", "4", "--seq-len", "16", "--batch-size", "4", "--microbatches", "2", "--lr", "1e-2"]


def run(capfd, *argv):
    code = main(["train", *map(str, argv)])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _tokenizer_dir(directory, words):
    """A word-level tokenizer saved the way a checkpoint ships it (tokenizer.json + config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    return directory


# -- the run ------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_train_pp2_smoke(tmp_path, capfd):
    model_dir = tmp_path / "model"
    code, out, err = run(capfd, *SMALL, "--pp", "2", "--log-every", "1", "--model-dir", model_dir)
    assert code == 0, err
    # the built-in model went through a real checkpoint: config + safetensors on disk
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 256
    assert (model_dir / "model.safetensors").is_file()
    assert "byte tokens" in out and "pp=2, 1F1B, 2 microbatches of 2 x 16 tokens, 4 steps" in out
    # progress from one rank only: each step once
    steps = re.findall(r"^step (\d)/4  loss (\S+)  ([\d,]+) tokens/s  (\d+)s left$", out, re.M)
    assert [int(s[0]) for s in steps] == [1, 2, 3, 4]
    losses = [float(s[1]) for s in steps]
    assert all(math.isfinite(loss) for loss in losses)
    # random init spreads probability evenly over the 256 bytes: the first loss is close to ln 256
    assert abs(losses[0] - math.log(256)) < 0.3
    assert losses[-1] < losses[0]
    done = re.search(
        r"^done: 4 steps, loss (\S+) -> (\S+) \(mean of the first and last 2\), ([\d,]+) tokens/s, "
        r"training \S+s, wall time \S+s$",
        out,
        re.M,
    )
    assert done, out
    assert float(done[1]) == pytest.approx(sum(losses[:2]) / 2, abs=1e-3)
    assert float(done[2]) == pytest.approx(sum(losses[2:]) / 2, abs=1e-3)
    assert int(done[3].replace(",", "")) > 0


@pytest.mark.distributed
def test_worker_failure_is_reported(tmp_path, capfd):
    # config.json without weights passes every check in the launching process; loading fails in the
    # worker (one is enough to see the error come back, and starts faster than two)
    LlamaConfig(**BUILTIN_MODEL, num_hidden_layers=2).save_pretrained(tmp_path)
    code, out, err = run(capfd, *SMALL, "--pp", "1", "--model", tmp_path)
    assert code == 1
    assert "ppzoo train: error: worker rank 0 failed (exit code 1)" in err
    assert "no model.safetensors or model.safetensors.index.json" in err
    assert "done:" not in out


# -- option checks, before any worker starts ----------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "6", "--microbatches", "4"], "--batch-size 6 is not divisible by --microbatches 4"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--pp", "0"], "--pp must be >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--data", "no/such/file.txt"], "--data 'no/such/file.txt' is not a file"),
        (["--model", "m", "--model-dir", "d"], "drop it when passing --model"),
        (["--model", __file__], f"--model {__file__!r} is a file; pass the checkpoint directory"),
        (["--model", "./no/such/model"], "--model './no/such/model': no such directory"),
        (["--schedule", "Bogus"], "unknown schedule 'Bogus'"),
    ],
)
def test_option_errors(argv, message, capfd):
    code, out, err = run(capfd, *argv)
    assert code == 2
    assert message in err, err
    assert out == ""


def test_schedule_needs_microbatches(capfd):
    code, _, err = run(capfd, "--pp", "2", "--microbatches", "1", "--batch-size", "4")
    assert code == 2
    assert "1F1B needs at least as many microbatches as stages: got 1 microbatches for 2 stages" in err


def test_seq_len_beyond_the_model(tmp_path, capfd):
    LlamaConfig(**{**BUILTIN_MODEL, "max_position_embeddings": 64}, num_hidden_layers=2).save_pretrained(tmp_path)
    code, _, err = run(capfd, "--model", tmp_path, "--seq-len", "65")
    assert code == 2
    assert "--seq-len 65 exceeds the model's max_position_embeddings 64" in err


def test_corpus_shorter_than_a_sequence(corpus, capfd):
    code, _, err = run(capfd, "--data", corpus, "--seq-len", "4096")
    assert code == 2
    assert f"gives {len(TEXT)} tokens, fewer than --seq-len 4096" in err


def test_data_not_utf8(tmp_path, capfd):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    code, _, err = run(capfd, "--data", bad)
    assert code == 2
    assert "is not UTF-8 text" in err and "latin1.txt" in err


# -- tokens --------------------------------------------------------------------------------------
def test_byte_tokens_without_tokenizer(tmp_path, corpus):
    tokens, kind = load_tokens(tmp_path, corpus, vocab_size=256)
    assert kind == "byte"
    assert tokens.dtype == torch.long
    assert tokens.tolist() == list(TEXT.encode("utf-8"))


def test_small_vocab_without_tokenizer_is_refused(tmp_path, corpus, capfd):
    with pytest.raises(ValueError, match=r"no tokenizer files .* vocab_size 96 is too small for byte tokens \(256\)"):
        load_tokens(tmp_path, corpus, vocab_size=96)
    # the command refuses it before launching
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    code, out, err = run(capfd, "--model", tmp_path, "--data", corpus, "--seq-len", "16")
    assert code == 2
    assert "vocab_size 96 is too small" in err and "step" not in out


def test_checkpoint_tokenizer_is_used(tmp_path, corpus):
    from transformers import AutoTokenizer

    words = sorted(set(TEXT.split()))
    _tokenizer_dir(tmp_path, words)
    tokens, kind = load_tokens(tmp_path, corpus, vocab_size=len(words) + 1)
    assert kind == "tokenizer"
    expected = AutoTokenizer.from_pretrained(tmp_path)(TEXT, add_special_tokens=False)["input_ids"]
    assert tokens.tolist() == expected
    assert len(tokens) == len(TEXT.split())  # one id per word: not bytes
    assert 0 not in tokens.tolist()  # every word is known, none maps to [UNK]


def test_tokenizer_outside_the_vocab_is_refused(tmp_path, corpus):
    words = sorted(set(TEXT.split()))
    _tokenizer_dir(tmp_path, words)
    with pytest.raises(ValueError, match=rf"gives token id {len(words)}, outside the model's vocab_size 4"):
        load_tokens(tmp_path, corpus, vocab_size=4)


def test_broken_tokenizer_is_reported(tmp_path, corpus):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load the tokenizer in"):
        load_tokens(tmp_path, corpus, vocab_size=256)


def test_batches_are_seeded_windows():
    tokens = torch.arange(1000)
    a = sample_batch(tokens, batch_size=6, seq_len=32, generator=torch.Generator().manual_seed(3))
    b = sample_batch(tokens, batch_size=6, seq_len=32, generator=torch.Generator().manual_seed(3))
    c = sample_batch(tokens, batch_size=6, seq_len=32, generator=torch.Generator().manual_seed(4))
    assert a.shape == (6, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each row is a contiguous window of the corpus
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(6, 32))
    assert int(a.max()) < 1000


# -- saving and resuming -------------------------------------------------------------------------
def _uninterrupted(model_dir, out, monkeypatch, *, steps):
    """The same job as ``SMALL`` run straight through in this process, as a one-rank pipeline."""
    from importlib import resources

    import torch.distributed as dist

    from ppzoo.testing.distributed import _free_port
    from ppzoo.train import DEFAULT_CORPUS, TrainJob, train_worker

    tokens, _ = load_tokens(model_dir, resources.files("ppzoo") / "data" / DEFAULT_CORPUS, vocab_size=256)
    torch.save(tokens, out / "tokens.pt")
    job = TrainJob(
        model=str(model_dir),
        tokens_path=str(out / "tokens.pt"),
        pp=1,
        schedule="1F1B",
        microbatches=2,
        steps=steps,
        lr=1e-2,
        seq_len=16,
        batch_size=4,
        seed=0,
        dtype="float32",
        device="cpu",
        log_every=1,
        save=str(out / "run"),
    )
    for key, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    ).items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    try:
        return train_worker(job)["losses"]
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


def _tensors(directory):
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return {k: v for name in set(index["weight_map"].values()) for k, v in load_file(directory / name).items()}


@pytest.mark.distributed
def test_resumed_run_continues_exactly(tmp_path, capfd, monkeypatch):
    from ppzoo.checkpoint import saved_step

    model_dir, saved = tmp_path / "model", tmp_path / "saved"
    # two steps at pp=2, saved; then resumed at pp=1 up to step 4, saving into the same directory
    code, first, err = run(
        capfd, *SMALL, "--steps", "2", "--pp", "2", "--log-every", "1", "--model-dir", model_dir, "--save", saved
    )
    assert code == 0, err
    code, second, err = run(capfd, *SMALL, "--pp", "1", "--log-every", "1", "--resume", saved, "--save", saved)
    assert code == 0, err
    assert f"resuming from {saved} at step 2" in second
    assert f"({saved / 'model'})" in second  # the model comes from the saved run
    printed = re.findall(r"^step (\d)/\d  loss (\S+)", first + second, re.M)
    reference = tmp_path / "reference"
    reference.mkdir()
    losses = _uninterrupted(model_dir, reference, monkeypatch, steps=4)
    assert printed == [(str(i + 1), f"{loss:.4f}") for i, loss in enumerate(losses)]
    assert saved_step(saved / "state") == 4
    resumed, straight = _tensors(saved / "model"), _tensors(reference / "run" / "model")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # nothing left to do at step 4: refused before any worker starts
    code, _, err = run(capfd, *SMALL, "--resume", saved)
    assert code == 2
    assert f"--resume {str(saved)!r} is at step 4, --steps is 4; raise --steps above 4 to train further" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--save-every", "2"], "--save-every 2 needs --save DIR, the directory to save into"),
        (["--save", "out", "--save-every", "0"], "--save-every must be >= 1, got 0"),
        (["--save", __file__], f"--save {__file__!r} is a file; pass a directory (it gets model/ and state/)"),
        (["--resume", "."], "--resume '.': "),
        (["--resume", ".", "--model-dir", "d"], "drop it when resuming"),
    ],
)
def test_checkpoint_option_errors(argv, message, capfd):
    code, out, err = run(capfd, *argv)
    assert code == 2
    assert message in err, err
    assert out == ""
