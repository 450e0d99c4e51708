"""``ppzoo train``: runs, worker failures, option checks, the config file, accumulation, resuming."""

import argparse
import contextlib
import json
import math
import os
import re
import sys

import pytest
import torch
from transformers import LlamaConfig

from ppzoo.architectures.llama import TINY
from ppzoo.cli import main
from ppzoo.data import PackedData, Tokenizer
from ppzoo.train import BUILTIN_MODEL, DEFAULTS, add_arguments, resolve_options

TEXT = "the pipeline splits the model into stages, and each rank runs the stage it holds. " * 8
#: a run small enough for a test: two workers, a few tiny steps
SMALL = ["--steps", "4", "--seq-len", "16", "--batch-size", "4", "--microbatches", "2", "--lr", "1e-2"]
#: a progress line: step, loss, grad norm, lr, tokens/s, peak memory, time left
STEP = re.compile(
    r"^step +(\d+)/\d+  loss (\S+)(?:  eval loss (\S+) ppl \S+)?  grad norm (\S+)  lr (\S+)  ([\d,]+) tokens/s  "
    r"peak mem \S+ GiB  \d+s left$",
    re.M,
)


def run(capfd, *argv):
    code = main(["train", *map(str, argv)])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# -- the run ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _captured(directory):
    """Capture this process's output and its workers' (file descriptors 1 and 2) in files; yields
    ``read()``.

    NOTE: for a module-scoped fixture, where ``capfd`` (function-scoped) cannot be used.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    paths = [directory / "stdout", directory / "stderr"]
    saved, streams = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr)
    try:
        for fd, path in zip((1, 2), paths):
            with open(path, "wb") as file:
                os.dup2(file.fileno(), fd)
        # NOTE: pytest's capture replaces sys.stdout too; this process writes through the same fds
        sys.stdout, sys.stderr = (open(fd, "w", encoding="utf-8", buffering=1, closefd=False) for fd in (1, 2))
        yield lambda: [path.read_text(encoding="utf-8") for path in paths]
    finally:
        for stream in (sys.stdout, sys.stderr):
            if stream not in streams:
                stream.close()  # NOTE: closefd=False: flushes, leaves the descriptor to dup2 below
        sys.stdout, sys.stderr = streams
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    """``SMALL`` at pp=2, saved: the smoke test reads its output, the resume test goes on from it.

    NOTE: one launch of two workers instead of two such launches (each worker imports torch and
    transformers, many seconds of CPU).
    """
    directory = tmp_path_factory.mktemp("pp2")
    model_dir, saved = directory / "model", directory / "saved"
    argv = [*SMALL, "--pp", "2", "--log-every", "1", "--model-dir", model_dir, "--save", saved]
    with _captured(directory) as read:
        code = main(["train", *map(str, argv)])
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = read()
    # the metrics as this run left them (the resume test appends to the file)
    return code, out, err, model_dir, saved, (saved / "metrics.jsonl").read_text()


@pytest.mark.distributed
def test_train_pp2_smoke(pp2_run):
    code, out, err, model_dir, _, metrics = pp2_run
    assert code == 0, err
    # the built-in model went through a real checkpoint: config + safetensors on disk
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 256
    assert (model_dir / "model.safetensors").is_file()
    assert "byte tokens to learn" in out and "pp=2, 1F1B, 2 microbatches of 2 x 16 tokens, 4 steps" in out
    # progress from one rank only: each step once
    steps = STEP.findall(out)
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
    # the same numbers, unrounded, in the metrics file; one peak memory per rank
    records = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [f"{r['loss']:.4f}" for r in records] == [s[1] for s in steps]
    assert all(len(r["peak_memory_bytes"]) == 2 and min(r["peak_memory_bytes"]) > 0 for r in records)
    assert all(r["grad_norm"] > 0 and r["lr"] == 1e-2 and r["mfu"] is None for r in records)


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
        (
            ["--batch-size", "6", "--microbatches", "2", "--dp-shard", "2", "--pp", "1"],
            "--batch-size 6 is not divisible by --microbatches 2 x 2 data-parallel ranks; use a batch size that is a multiple of 4",
        ),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
        (["--dp-shard", "0"], "--dp-shard must be >= 1, got 0"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be a positive number, got -1.0"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0, got -0.1"),
        (["--betas", "0.9,1.5"], "--betas must both be in [0, 1), got 0.9,1.5"),
        (["--warmup-steps", "200"], "--warmup-steps 200 must be between 0 and --steps 100"),
        (["--min-lr", "1"], "--min-lr 1.0 must be between 0 and --lr 0.003"),
        (["--pp", "0"], "--pp must be >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--data", "no/such/file.txt"], "--data 'no/such/file.txt': no such file or directory"),
        (["--eval-every", "5"], "--eval-every 5 needs --eval-data"),
        (["--eval-data", "no/such.jsonl"], "--eval-data 'no/such.jsonl': no such file or directory"),
        (
            ["--mixed-precision", "fp16"],
            "--mixed-precision fp16 with --dtype float32: mixed_precision='fp16' is not supported",
        ),
        (["--mixed-precision", "bf16", "--dtype", "bfloat16"], "--mixed-precision bf16 with --dtype bfloat16"),
        (
            ["--activation-checkpointing", "some"],
            "--activation-checkpointing: activation_checkpointing='some' is not one of",
        ),
        (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"], "--node-rank must be in 0..1, got 2"),
        (["--nnodes", "3", "--rdzv-endpoint", "h:1"], "= 2 processes do not split evenly over --nnodes 3"),
        (["--node-rank", "1"], "--node-rank and --rdzv-endpoint are for several machines; pass --nnodes too"),
        (["--metrics", "."], "--metrics '.' is a directory; pass a file name"),
        (["--stop-at", "100"], "--stop-at 100 is not before the last step (--steps 100)"),
        (["--stop-at", "0"], "--stop-at must be >= 1, got 0"),
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


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_data_is_refused(tmp_path, capfd, name):
    (tmp_path / name).write_text("")
    code, out, err = run(capfd, "--data", tmp_path / name)
    assert code == 2
    assert f"--data {str(tmp_path / name)!r} is empty; pass a file with text to train on" in err
    assert out == ""


def test_data_not_utf8(tmp_path, capfd):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    code, _, err = run(capfd, "--data", bad, "--pp", "1", "--microbatches", "1")
    assert code == 2
    assert "is not UTF-8 text" in err and "latin1.txt" in err


def test_small_vocab_without_tokenizer_is_refused(tmp_path, corpus, capfd):
    with pytest.raises(ValueError, match=r"no tokenizer files .* vocab_size 96 is too small for byte tokens \(256\)"):
        Tokenizer(tmp_path, vocab_size=96)
    # the command refuses it before launching
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    code, out, err = run(capfd, "--model", tmp_path, "--data", corpus, "--seq-len", "16")
    assert code == 2
    assert "vocab_size 96 is too small" in err and "step" not in out


# -- --save is checked before anything trains ----------------------------------------------------
def test_save_over_something_else_is_refused(tmp_path, capfd):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "notes.txt").write_text("mine")
    code, out, err = run(capfd, "--save", tmp_path / "run")
    assert code == 2 and out == ""
    assert f"{str(tmp_path / 'run' / 'model')!r} exists and is not a model checkpoint (no config.json)" in err
    (tmp_path / "other" / "state").mkdir(parents=True)
    code, _, err = run(capfd, "--save", tmp_path / "other")
    assert code == 2
    assert "exists and is not a ppzoo training state" in err


def test_save_under_a_file_is_refused(tmp_path, capfd):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capfd, "--save", tmp_path / "file" / "run")
    assert code == 2
    assert f"lies under the file {str(tmp_path / 'file')!r}" in err


# -- the config file -----------------------------------------------------------------------------
def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_options(parser.parse_args([str(a) for a in argv]))


def test_config_file_under_the_command_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('seq-len = 64\nlr = 1\nlr_schedule = "cosine"\nbetas = [0.9, 0.95]\ncompile = true\nsteps = 7\n')
    options = _parse("--config", config, "--steps", "9")
    assert options.seq_len == 64 and options.lr == 1.0 and isinstance(options.lr, float)
    assert options.lr_schedule == "cosine" and options.betas == (0.9, 0.95) and options.compile is True
    assert options.steps == 9  # the command line wins
    assert options.pp == DEFAULTS["pp"] and options.batch_size == DEFAULTS["batch_size"]
    # an option given on the command line at its default value still wins over the file
    assert _parse("--config", config, "--steps", DEFAULTS["steps"]).steps == DEFAULTS["steps"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("seq_lenn = 3", "unknown option 'seq_lenn'; options: model, model-dir"),
        ('steps = "ten"', "'steps' must be an integer, got 'ten'"),
        ("steps = true", "'steps' must be an integer, got True"),
        ('lr-schedule = "step"', "'lr-schedule' is 'step'; choose from constant, linear, cosine, wsd"),
        ("betas = [1]", "'betas' must be two numbers"),
        ("compile = 1", "'compile' must be true or false"),
        ("steps = ", "is not TOML"),
    ],
)
def test_bad_config_file(tmp_path, capfd, content, message):
    config = tmp_path / "run.toml"
    config.write_text(content)
    code, out, err = run(capfd, "--config", config)
    assert code == 2 and out == ""
    assert f"--config {str(config)!r}" in err and message in err, err


# -- gradient accumulation -----------------------------------------------------------------------
@pytest.fixture
def one_rank(monkeypatch):
    """A one-process group in this process (world size 1)."""
    import torch.distributed as dist

    from ppzoo.testing.distributed import free_port

    for key, value in dict(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    ).items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
def test_accumulation_is_the_mean_over_all_tokens(tmp_path, one_rank):
    import ppzoo
    from ppzoo.loss import IGNORE_INDEX
    from ppzoo.train import build_model
    from ppzoo.training_loop import accumulate

    build_model(tmp_path, layers=2, seq_len=16)
    pipe = ppzoo.pipeline(tmp_path, pp=1, microbatches=2, seq_len=16)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for learnt in (30, 10):  # batches with different numbers of learnt tokens weigh differently
        ids = torch.randint(0, 256, (4, 16), generator=generator)
        labels = ids.clone().view(-1)
        labels[learnt:] = IGNORE_INDEX
        position_ids = torch.arange(16).expand(4, 16)
        batches.append({"input_ids": ids, "labels": labels.view(4, 16), "position_ids": position_ids})
    rows = slice(0, 4)
    loss = accumulate(pipe, batches, rows)
    accumulated = {name: p.grad.clone() for name, p in pipe.named_parameters()}
    for p in pipe.parameters():
        p.grad = None
    whole = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    pipe2 = ppzoo.pipeline(tmp_path, pp=1, microbatches=2, seq_len=16)
    reference = pipe2.step(whole["input_ids"], labels=whole["labels"], position_ids=whole["position_ids"])
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    for name, p in pipe2.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.distributed
def test_evaluation_is_the_unsplit_models_token_mean(tmp_path, one_rank):
    from transformers import AutoModelForCausalLM

    import ppzoo
    from ppzoo.data import Document, pack
    from ppzoo.loss import IGNORE_INDEX
    from ppzoo.train import build_model
    from ppzoo.training_loop import evaluate

    build_model(tmp_path, layers=2, seq_len=16)
    generator = torch.Generator().manual_seed(1)
    docs = []
    for length in (20, 7, 33, 9):  # 69 tokens: 5 rows of 16, the last padded; 5 rows in batches of 4
        ids = torch.randint(0, 256, (length,), generator=generator).tolist()
        docs.append(Document(ids, ids))
    data = pack(docs, 16)
    assert data.rows == 5
    pipe = ppzoo.pipeline(tmp_path, pp=1, microbatches=2, seq_len=16)
    loss, tokens = evaluate(pipe, data, batch_size=4, rows=slice(0, 4))
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        # NOTE: no cache, as in training: with one, Hugging Face does not read restarts as packed sequences
        logits = model(data.input_ids, position_ids=data.position_ids, use_cache=False).logits
    targets = torch.nn.functional.pad(data.labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    reference = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 256), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert tokens == int((targets != IGNORE_INDEX).sum())
    assert loss == pytest.approx(reference.item(), rel=1e-5)


# -- saving and resuming -------------------------------------------------------------------------
def _uninterrupted(model_dir, out, *, steps):
    """The same job as ``SMALL`` run straight through in this process, as a one-rank pipeline."""
    from importlib import resources

    from ppzoo.data import load_data
    from ppzoo.train import DEFAULT_CORPUS, TrainJob, train_worker

    corpus = resources.files("ppzoo") / "corpus" / DEFAULT_CORPUS
    load_data(str(corpus), Tokenizer(model_dir, vocab_size=256), seq_len=16).save(out / "data.pt")
    job = TrainJob(
        model=str(model_dir),
        data_path=str(out / "data.pt"),
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
    return train_worker(job)["losses"]


def _tensors(directory):
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return {k: v for name in set(index["weight_map"].values()) for k, v in load_file(directory / name).items()}


@pytest.mark.distributed
def test_resumed_run_continues_exactly(pp2_run, tmp_path, capfd, one_rank):
    from ppzoo.checkpoint import saved_step

    # four steps at pp=2, saved (the smoke test's run); then resumed at pp=1 up to step 6, saving
    # into the same directory
    code, first, err, model_dir, saved, _ = pp2_run
    assert code == 0, err
    code, second, err = run(
        capfd, *SMALL, "--steps", "6", "--pp", "1", "--log-every", "1", "--resume", saved, "--save", saved
    )
    assert code == 0, err
    assert f"resuming from {saved} at step 4" in second
    assert f"({saved / 'model'})" in second  # the model comes from the saved run
    printed = [(s[0], s[1]) for s in STEP.findall(first + second)]
    reference = tmp_path / "reference"
    reference.mkdir()
    losses = _uninterrupted(model_dir, reference, steps=6)
    assert printed == [(str(i + 1), f"{loss:.4f}") for i, loss in enumerate(losses)]
    assert saved_step(saved / "state") == 6
    resumed, straight = _tensors(saved / "model"), _tensors(reference / "run" / "model")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    # the metrics file in the save directory holds both runs' steps
    steps = [json.loads(line)["step"] for line in (saved / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # nothing left to do at step 6: refused before any worker starts
    code, _, err = run(capfd, *SMALL, "--steps", "6", "--resume", saved)
    assert code == 2
    assert f"--resume {str(saved)!r} is at step 6, --steps is 6; raise --steps above 6 to train further" in err


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


# -- everything at once: 4 workers, FSDP2 inside a 2-stage pipeline ---------------------------------
@pytest.mark.distributed
def test_data_parallel_mixed_precision_run_trains_evaluates_and_resumes_exactly(tmp_path, capfd):
    sentences = [TEXT[i : i + 60] for i in range(0, 400, 20)]
    data = _jsonl(tmp_path / "train.jsonl", sentences)
    held_out = _jsonl(tmp_path / "eval.jsonl", sentences[::3])
    common = [
        "--dp-shard", "2", "--pp", "2", "--mixed-precision", "bf16", "--activation-checkpointing", "full",
        "--max-grad-norm", "1.0", "--lr-schedule", "cosine", "--warmup-steps", "5", "--lr", "1e-2",
        "--data", data, "--eval-data", held_out, "--seq-len", "32", "--batch-size", "4", "--microbatches", "2",
        "--log-every", "1",
    ]  # fmt: skip
    model, straight_dir, split_dir = tmp_path / "model", tmp_path / "straight", tmp_path / "split"
    code, straight, err = run(
        capfd, *common, "--model-dir", model, "--steps", 8, "--eval-every", 4, "--save", straight_dir
    )
    assert code == 0, err
    assert "dp_shard=2" in straight
    steps = STEP.findall(straight)
    losses = [float(s[1]) for s in steps]
    assert len(losses) == 8 and losses[-1] < losses[0]
    evals = [float(e) for e in re.findall(r"eval loss (\S+) ppl", straight)]
    assert len(evals) == 2 and evals[1] < evals[0]  # evaluated at steps 4 and 8, and learning
    assert all(float(s[3]) > 0 for s in steps)  # grad norms measured
    # warm-up then cosine: rising for five steps, then falling
    rates = [float(s[4]) for s in steps]
    assert rates[:5] == sorted(rates[:5]) and rates[4:] == sorted(rates[4:], reverse=True)
    # the same run, stopped after step 4 (as if interrupted) and resumed: the same losses and the same weights, bit for bit
    code, first, err = run(capfd, *common, "--model", model, "--steps", 8, "--stop-at", 4, "--save", split_dir)
    assert code == 0, err
    code, second, err = run(capfd, *common, "--steps", 8, "--eval-every", 4, "--resume", split_dir, "--save", split_dir)
    assert code == 0, err
    assert [s[:2] for s in STEP.findall(first + second)] == [s[:2] for s in steps]
    assert re.findall(r"eval loss (\S+) ppl", second) == re.findall(r"eval loss (\S+) ppl", straight)[1:]
    a, b = _tensors(straight_dir / "model"), _tensors(split_dir / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_batches_warns(tmp_path, capfd):
    from ppzoo.train import _record_data_order

    data = PackedData(torch.arange(8).view(2, 4), torch.arange(8).view(2, 4), torch.arange(4).expand(2, 4), 1)
    options = dict(seq_len=4, batch_size=2, grad_accum=1, seed=0)
    _record_data_order(data, argparse.Namespace(**options, resume=None, save=str(tmp_path)))
    _record_data_order(data, argparse.Namespace(**options, resume=str(tmp_path), save=str(tmp_path)))
    assert capfd.readouterr().err == ""  # the same data and order: nothing to say
    other = PackedData(data.input_ids + 1, data.labels, data.position_ids, 1)
    _record_data_order(other, argparse.Namespace(**{**options, "batch_size": 1}, resume=str(tmp_path), save=None))
    err = capfd.readouterr().err
    assert f"warning: the data, --batch-size 1 (saved: 2) differ from the run saved in {tmp_path}" in err


@pytest.mark.distributed
def test_two_machines_meet_at_the_endpoint(tmp_path, capfd):
    """Two launchers on this host stand for two machines (fixed ranks, as the Slurm script runs them)."""
    import os
    import subprocess
    import sys

    from ppzoo.testing.distributed import free_port

    argv = [*SMALL, "--steps", "2", "--log-every", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    other = subprocess.Popen(
        [sys.executable, "-m", "ppzoo.cli", "train", *argv, "--node-rank", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        code, out, err = run(capfd, *argv, "--node-rank", "0")
        other_out, _ = other.communicate(timeout=300)
    finally:
        other.kill()
    assert code == 0, err
    assert other.returncode == 0, other_out
    # one worker a machine, one pipeline of two stages: rank 0 (here) reports, the other machine does not
    assert [s[0] for s in STEP.findall(out)] == ["1", "2"] and "done: 2 steps" in out
    assert "pp=2" in other_out and "done:" not in other_out


# -- the optimizer --------------------------------------------------------------------------------
def test_the_trainers_adamw_is_fused_where_the_device_has_the_kernel_and_updates_as_torchs_default():
    from ppzoo.training_loop import adamw

    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32), torch.randn(100, 8)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]
    params = {kind: [torch.nn.Parameter(w.clone()) for w in weights] for kind in ("fused", "default")}
    optimizers = {
        "fused": adamw(params["fused"], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
        "default": torch.optim.AdamW(params["default"], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
    }
    assert optimizers["fused"].defaults["fused"] is True
    assert not optimizers["default"].defaults["fused"]
    for step in grads:
        for kind, optimizer in optimizers.items():
            for p, g in zip(params[kind], step):
                p.grad = g.clone()
            optimizer.step()
    for fused, default, start in zip(params["fused"], params["default"], weights):
        assert not torch.equal(fused, start)
        torch.testing.assert_close(fused, default, rtol=0, atol=1e-6)
    # a state saved by either kind loads into the other and steps on alike
    default_state, fused_state = optimizers["default"].state_dict(), optimizers["fused"].state_dict()
    optimizers["fused"].load_state_dict(default_state)
    optimizers["default"].load_state_dict(fused_state)
    for kind, optimizer in optimizers.items():
        for p, g in zip(params[kind], grads[0]):
            p.grad = g.clone()
        optimizer.step()
    for fused, default in zip(params["fused"], params["default"]):
        torch.testing.assert_close(fused, default, rtol=0, atol=1e-6)
    # a parameter on a device without the kernel (here the meta device) keeps torch's default
    assert not adamw([torch.nn.Parameter(torch.empty(4, device="meta"))], lr=1e-3).defaults["fused"]
