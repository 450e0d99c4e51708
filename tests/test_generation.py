"""Generation (``ppzoo.generation``, ``Pipeline.generate``): token for token Hugging Face's ``generate``.

The conformance kit's ``generate`` check covers every adapter with stages chained in one process
(1, 2 and 4 stages), the native adapter's GPT-2 included. Here: the pipelined engine across
processes — one spawned 2-rank gloo group runs every case (pp=2 with one stage a rank, 4 stages in
loop and V placement, stages without layers, Gemma 2's sliding windows, soft-caps and tied head,
an MoE; the native adapter's GPT-2 and a sample of the families it runs; tensor parallelism and
both kinds of data parallelism), each case comparing with the unsplit model's ``generate`` and
returning its problems instead of raising; then the kit's check catching a broken adapter, the
refusals, and what sampling relies on in torch.
"""

from __future__ import annotations

import traceback

import pytest
import torch

import ppzoo
from ppzoo import registry
from ppzoo.architectures.llama import LlamaAdapter
from ppzoo.testing.checks import GENERATE_SEED, SAMPLING, check_generate
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, load_reference, save_tiny_model

NEW = 8
LAYERS = [f"model.layers.{i}" for i in range(8)]
#: an embedding-only first stage and a head-only last stage
ENDS = [["model.embed_tokens", *LAYERS[:4]], [*LAYERS[4:], "model.norm", "lm_head"]]
SPLIT_ENDS = [["model.embed_tokens"], LAYERS[:4], LAYERS[4:], ["model.norm", "lm_head"]]


def _prompts(vocab: int, batch_size: int = 4):
    ids, mask, _ = batch(vocab, batch_size=batch_size, seq_len=10, seed=3)
    mask[1, :5] = 0  # four prompt lengths: 10, 5, 10, 7
    ids[1, :5] = 0
    return ids, mask


def _compare(label, got, want, problems):
    if not torch.equal(got, want):
        problems.append(f"{label}: {got.tolist()} != Hugging Face's {want.tolist()}")


def _pipeline_case(directory, schedule, stage_modules=None, sample=True):
    """Greedy (several microbatches and one), eos, no mask, seeded sampling, streamed tokens."""
    reference = load_reference(directory)
    reference.config.output_router_logits = False  # NOTE: as the kit's check: transformers' generate fails with it
    ids, mask = _prompts(reference.config.vocab_size)
    pipe = ppzoo.pipeline(
        directory, pp=2, schedule=schedule, device="cpu", attn_implementation="eager", stage_modules=stage_modules
    )
    problems, outputs = [], {}
    with torch.no_grad():
        greedy = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    seen: list[tuple[list[int], list[int]]] = []
    got = pipe.generate(ids, mask, max_new_tokens=NEW, on_tokens=lambda r, t: seen.append((r.tolist(), t.tolist())))
    outputs["greedy"] = got
    _compare(f"{schedule} greedy", got, greedy, problems)
    # NOTE: a row that ends at the checkpoint's eos streams no padding after it
    streamed = _after_eos(greedy[:, ids.shape[1] :], reference.generation_config.eos_token_id)
    for step_rows, tokens in _by_step(seen):
        streamed[step_rows[0], step_rows[1]] = torch.tensor(tokens)
    if not torch.equal(streamed, greedy[:, ids.shape[1] :]):
        problems.append(f"{schedule}: on_tokens streamed {streamed.tolist()}")
    _compare(
        f"{schedule} greedy, one microbatch",
        pipe.generate(ids, mask, max_new_tokens=NEW, microbatches=1),
        greedy,
        problems,
    )
    full = torch.ones_like(mask)
    with torch.no_grad():
        unpadded = reference.generate(ids, attention_mask=full, max_new_tokens=NEW, do_sample=False)
    _compare(f"{schedule} greedy, no mask", pipe.generate(ids, max_new_tokens=NEW), unpadded, problems)
    eos = _eos_of(greedy, ids.shape[1])
    with torch.no_grad():
        ended = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    if not bool((ended[:, ids.shape[1] : -1] == eos).any()):
        problems.append(f"{schedule}: eos {eos} ends no row early; the case does not test eos")
    _compare(f"{schedule} eos {eos}", pipe.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos), ended, problems)
    if sample:
        torch.manual_seed(GENERATE_SEED)
        with torch.no_grad():
            sampled = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, **SAMPLING)
        got = pipe.generate(ids, mask, max_new_tokens=NEW, do_sample=True, seed=GENERATE_SEED, **SAMPLING)
        outputs["sampled"] = got
        _compare(f"{schedule} sampling", got, sampled, problems)
        # seed=None: torch's own generator, in whatever state the caller left it
        torch.manual_seed(GENERATE_SEED)
        got = pipe.generate(ids, mask, max_new_tokens=NEW, do_sample=True, **SAMPLING)
        _compare(f"{schedule} sampling, torch.manual_seed", got, sampled, problems)
    return {"problems": problems, "outputs": outputs}


def _after_eos(new, eos):
    """``new`` where it follows a row's first eos token (the padding of ended rows), -1 elsewhere."""
    ended = torch.isin(new, torch.tensor(eos if isinstance(eos, list) else [] if eos is None else [eos]))
    after = (ended.long().cumsum(1) - ended.long()) > 0
    return torch.where(after, new, -1)


def _eos_of(greedy, length):
    """A token one row generates before its last step and another row never does (so it ends one
    row early while the other goes on); the second token of row 0 when there is none."""
    new = greedy[:, length:]
    for row in range(new.shape[0]):
        for token in new[row, :-1].tolist():
            if any(token not in other.tolist() for other in new):
                return int(token)
    return int(new[0, 1])


def _by_step(seen):
    """``(rows, steps), tokens`` per on_tokens call; a row's n-th call is its step n."""
    count: dict[int, int] = {}
    for rows, tokens in seen:
        steps = []
        for row in rows:
            steps.append(count.get(row, 0))
            count[row] = steps[-1] + 1
        yield (rows, steps), tokens


def _parallel_case(directory, degrees, rank):
    """pp=1 with ``degrees`` (tp=2, dp_shard=2 or dp_replicate=2) on the two ranks. Tensor-parallel
    ranks pass the same prompts; data-parallel replicas each their own, for a different number of
    tokens (each decodes at its own pace), and train a step afterwards."""
    reference = load_reference(directory)
    data_parallel = "tp" not in degrees
    ids, mask = _prompts(reference.config.vocab_size)
    if data_parallel and rank == 1:
        ids = ids.flip(1)[:2]  # NOTE: other prompts, other lengths, another batch size
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
    new = NEW - 3 * rank if data_parallel else NEW
    pipe = ppzoo.pipeline(directory, pp=1, device="cpu", attn_implementation="eager", microbatches=2, **degrees)
    problems, outputs = [], {}
    with torch.no_grad():
        greedy = reference.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        torch.manual_seed(GENERATE_SEED)
        sampled = reference.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, **SAMPLING)
    label = ",".join(f"{k}={v}" for k, v in degrees.items())
    outputs["greedy"] = pipe.generate(ids, mask, max_new_tokens=new)
    _compare(f"{label} greedy", outputs["greedy"], greedy, problems)
    _compare(f"{label} one microbatch", pipe.generate(ids, mask, max_new_tokens=new, microbatches=1), greedy, problems)
    torch.manual_seed(rank)  # NOTE: with seed=..., the ranks' own default generators do not matter
    got = pipe.generate(ids, mask, max_new_tokens=new, do_sample=True, seed=GENERATE_SEED, **SAMPLING)
    _compare(f"{label} sampling", got, sampled, problems)
    labels = ids.masked_fill(mask == 0, -100)
    loss = pipe.step(ids, labels=labels, attention_mask=mask)
    if not torch.isfinite(loss):
        problems.append(f"{label}: the training step after generating gave loss {loss}")
    return {"problems": problems, "outputs": outputs}


#: families the native adapter runs, sampled from the zoo: model type -> what they exercise
FAMILIES = {
    "bloom": "ALiBi from the attention mask, embedding layer norm, tuple-returning blocks",
    "falcon": "rotary, parallel attention and MLP, multi-query",
    "cohere2": "sliding-window and full layers interleaved, logit scale, tied head",
    "vaultgemma": "Gemma-style final logit soft-cap, tied head",
    "deepseek_v3": "MLA, dense-then-MoE layers",
    "jamba": "hybrid: Mamba layers (states, not keys) between attention layers, MoE MLPs",
}


def _family_config(model_type):
    """The zoo's tiny config of ``model_type``, drawn wide: a tiny model drawn as narrow as the
    defaults (0.02) predicts one token whatever the prompt, which leaves generation untested."""
    from ppzoo.testing.tiny_configs import tiny_config

    config = tiny_config(model_type)
    config.initializer_range = 0.5
    return config


def _rank_main(rank, world_size, directories):
    results = {}
    cases = [
        ("1F1B", _pipeline_case, (directories["llama"], "1F1B")),
        ("Interleaved1F1B", _pipeline_case, (directories["llama"], "Interleaved1F1B")),
        ("ZBVZeroBubble", _pipeline_case, (directories["llama"], "ZBVZeroBubble")),
        ("1F1B-ends", _pipeline_case, (directories["llama"], "1F1B", ENDS, False)),
        ("Interleaved1F1B-ends", _pipeline_case, (directories["llama"], "Interleaved1F1B", SPLIT_ENDS, False)),
        ("gemma2", _pipeline_case, (directories["gemma2"], "1F1B")),
        ("qwen2_moe", _pipeline_case, (directories["qwen2_moe"], "GPipe", None, False)),
        ("native-1F1B", _pipeline_case, (directories["native"], "1F1B")),
        ("native-Interleaved1F1B", _pipeline_case, (directories["native"], "Interleaved1F1B", None, False)),
        ("native-ZBVZeroBubble", _pipeline_case, (directories["native"], "ZBVZeroBubble", None, False)),
        *((f"native-{t}", _pipeline_case, (directories[t], "1F1B", None, False)) for t in FAMILIES),
        # NOTE: Jamba's 4 layers as 4 stages: two of them hold only a Mamba layer
        ("native-jamba-loop", _pipeline_case, (directories["jamba"], "Interleaved1F1B", None, False)),
        *((f"pp1-{d}2", _parallel_case, (directories["llama"], {d: 2}, rank)) for d in PARALLEL),
    ]
    for name, fn, args in cases:
        try:
            results[name] = fn(*args)
        except Exception:
            results[name] = {"problems": [traceback.format_exc()], "outputs": {}}
    return results


PARALLEL = ("tp", "dp_shard", "dp_replicate")
CASES = [
    "1F1B",
    "Interleaved1F1B",
    "ZBVZeroBubble",
    "1F1B-ends",
    "Interleaved1F1B-ends",
    "gemma2",
    "qwen2_moe",
    "native-1F1B",
    "native-Interleaved1F1B",
    "native-ZBVZeroBubble",
    *(f"native-{t}" for t in FAMILIES),
    "native-jamba-loop",
    "pp1-tp2",
]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    directories = {
        name: str(save_tiny_model(registry.adapters()[name], tmp_path_factory.mktemp(name)))
        for name in ("llama", "gemma2", "qwen2_moe", "native")
    }
    for model_type in FAMILIES:
        config = _family_config(model_type)
        adapter = registry.adapter_for(config)
        assert adapter.name == "native", f"{model_type} now has adapter {adapter.name!r}; sample another family"
        directories[model_type] = str(save_tiny_model(adapter, tmp_path_factory.mktemp(model_type), config=config))
    return run_distributed(_rank_main, 2, directories, timeout_s=900)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_pipelined_generate_equals_hugging_face(group_results, case):
    for rank, per_rank in enumerate(group_results):
        assert per_rank[case]["problems"] == [], f"rank {rank}"
    # every rank returns the same ids
    first, second = (per_rank[case]["outputs"] for per_rank in group_results)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.distributed
@pytest.mark.parametrize("degree", ["dp_shard", "dp_replicate"])
def test_each_data_parallel_replica_generates_its_own_prompts(group_results, degree):
    for rank, per_rank in enumerate(group_results):
        assert per_rank[f"pp1-{degree}2"]["problems"] == [], f"rank {rank}"


# -- in one process ------------------------------------------------------------------------------
class CachelessLayers(LlamaAdapter):
    """Takes the cache but does not give it to the layers: every step attends to itself only."""

    name = "cacheless"

    def call_layer(self, layer, hidden, *, mask, position_embeddings, position_ids, cache=None):
        return super().call_layer(
            layer, hidden, mask=mask, position_embeddings=position_embeddings, position_ids=position_ids
        )


class NoCacheArgument(LlamaAdapter):
    """A ``masks`` override written before generation: it takes no cache."""

    name = "no-cache-argument"

    def masks(self, inner, hidden, attention_mask, position_ids, needed):
        return super().masks(inner, hidden, attention_mask, position_ids, needed)


def test_the_generate_check_catches_layers_without_their_cache():
    with pytest.raises(AssertionError, match="generation vs Hugging Face"):
        check_generate(CachelessLayers())


def test_adapters_without_a_cache_argument_are_refused_by_name(tmp_path):
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.generation import generate_chain
    from ppzoo.planner import plan
    from ppzoo.stage import build_stage
    from ppzoo.testing.checks import resolving_to

    adapter = NoCacheArgument()
    assert "NoCacheArgument.masks takes no cache argument" in adapter.generation_problem(adapter.tiny_config())
    with resolving_to(adapter):
        directory = save_tiny_model(adapter, tmp_path)
        config = load_reference(directory).config
        stages = [build_stage(config, adapter, plan(directory, pp=1), 0, checkpoint=Checkpoint(directory))]
        with pytest.raises(ValueError, match="adapter 'no-cache-argument' does not support generation yet"):
            generate_chain(stages, torch.ones(1, 3, dtype=torch.long), adapter=adapter, config=config, max_new_tokens=2)


def test_the_kit_checks_the_native_adapters_generation():
    from ppzoo.testing.kit import cases

    native = registry.adapters()["native"]
    assert native.generation_problem(native.tiny_config()) is None
    (case,) = cases(native, select=["generate"])
    assert not case.skip


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("minimax", "keeps its keys and values in its own MiniMaxCache"),
        ("xlstm", "keeps its keys and values in its own xLSTMCache"),
        ("gemma3n_text", "later layers reuse the keys and values earlier layers stored (shared_kv_states)"),
        ("mamba", "MambaForCausalLM.prepare_inputs_for_generation changes what the forward is given at a step"),
    ],
)
def test_native_families_that_cannot_generate_say_why(model_type, reason):
    from ppzoo.testing.tiny_configs import tiny_config

    config = tiny_config(model_type)
    adapter = registry.adapter_for(config)
    assert adapter.name == "native"
    assert reason in adapter.generation_problem(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=2, do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p must be in"),
        (dict(max_new_tokens=2, top_k=-1), "top_k must be a non-negative integer"),
        (dict(max_new_tokens=2, microbatches=0), "microbatches must be a positive integer"),
    ],
)
def test_bad_settings_are_refused(tmp_path, kwargs, message):
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.generation import generate_chain
    from ppzoo.planner import plan
    from ppzoo.stage import build_stage

    adapter = registry.adapters()["llama"]
    directory = save_tiny_model(adapter, tmp_path)
    config = load_reference(directory).config
    stages = [build_stage(config, adapter, plan(directory, pp=1), 0, checkpoint=Checkpoint(directory))]
    with pytest.raises(ValueError, match=message):
        generate_chain(stages, torch.ones(2, 3, dtype=torch.long), adapter=adapter, config=config, **kwargs)


@pytest.mark.parametrize("shape", [(4, 96), (3, 1000)])
def test_multinomial_draws_exponential_noise_for_the_whole_batch(shape):
    """What seeded sampling relies on: ``torch.multinomial(p, 1)`` is ``argmax(p / q)`` with ``q``
    drawn by one ``exponential_`` call for the whole batch, so rows can be picked microbatch by
    microbatch from one draw (see ``ppzoo.generation``)."""
    probs = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    torch.manual_seed(11)
    want = torch.multinomial(probs, num_samples=1).squeeze(1)
    noise = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(11))
    got = torch.cat([torch.argmax(part / q, dim=-1) for part, q in zip(probs.split(2), noise.split(2))])
    assert torch.equal(got, want)


# -- ppzoo generate ------------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _tiny_tokenizer(directory):
    """A byte-level BPE tokenizer trained here on one sentence (no download), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>", "<s>", "</s>"]
    )
    tok.train_from_iterator(["hello world, the pipeline generates text"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama with a vocabulary of 300 and its tokenizer, in one directory."""
    directory = tmp_path_factory.mktemp("chat")
    adapter = registry.adapters()["llama"]
    config = adapter.tiny_config()
    config.vocab_size = 300
    save_tiny_model(adapter, directory, config=config)
    return directory, _tiny_tokenizer(directory)


def _hf_completion(directory, tokenizer, prompt, max_new_tokens):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = load_reference(directory).generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2)
    new = [t for t in out[0, ids.shape[1] :].tolist() if t != tokenizer.eos_token_id]
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.distributed
def test_generate_command_streams_hugging_faces_completion(chat_model, capfd):
    from ppzoo.cli import main

    directory, tokenizer = chat_model
    assert main(["generate", str(directory), "--pp", "2", "--prompt", "hello world", "--max-new-tokens", "12"]) == 0
    out = capfd.readouterr().out
    want = _hf_completion(directory, tokenizer, "hello world", 12)
    assert want.strip(), "the tiny model's completion is empty; the test would not see streaming"
    assert want + "\n" in out


@pytest.mark.distributed
def test_generate_command_prints_each_completion_of_a_prompts_file(chat_model, tmp_path, capfd):
    from ppzoo.cli import main

    directory, tokenizer = chat_model
    prompts = ["hello", "the pipeline generates"]
    path = tmp_path / "prompts.jsonl"
    path.write_text('"hello"\n{"messages": [{"role": "user", "content": "the pipeline generates"}]}\n')
    assert main(["generate", str(directory), "--pp", "2", "--prompts", str(path), "--max-new-tokens", "6"]) == 0
    out = capfd.readouterr().out
    for row, prompt in enumerate(prompts):
        assert f"[{row}] {_hf_completion(directory, tokenizer, prompt, 6)}\n" in out


def test_read_prompts_refuses_what_it_cannot_read(tmp_path):
    from ppzoo.completions import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1 holds"):
        read_prompts([], str(path))
    with pytest.raises(ValueError, match="no prompt"):
        read_prompts([], None)
    path.write_text('"a"\n\n{"prompt": "b"}\n')
    assert read_prompts(["c"], str(path)) == ["c", "a", "b"]


@pytest.mark.distributed
def test_training_prints_samples(tmp_path, capfd):
    from ppzoo.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the pipeline generates text, token by token.\n" * 40)
    argv = ["train", "--data", corpus, "--steps", "2", "--seq-len", "32", "--batch-size", "4"]
    argv += ["--microbatches", "2", "--sample-every", "1", "--sample-prompt", "the pipe", "--sample-tokens", "4"]
    assert main([str(a) for a in argv]) == 0
    out = capfd.readouterr().out
    assert "sample at step 1: '" in out and "sample at step 2: '" in out


def test_sampling_during_training_needs_a_prompt(capfd):
    from ppzoo.cli import main

    assert main(["train", "--sample-every", "5"]) == 2
    assert "--sample-every 5 needs --sample-prompt" in capfd.readouterr().err
