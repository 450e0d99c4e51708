"""Tied embeddings across stages: grads summed between first and last stage, copies stay identical.

The conformance kit checks tied weights for the adapters that tie by default (Gemma family, one
step). Here: any model with ``tie_word_embeddings=True`` (Llama, Qwen2) split into 1-4 stages in
one process, and several optimizer steps of the distributed pipeline, at pp=2 and pp=4.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.loss import causal_lm_loss
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, grad_mismatches, load_reference, save_tiny_model, tiny

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
STEPS = 3


# -- one process: the stage chain ----------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def chain_case(request, tmp_path_factory):
    """A saved tiny model with ``tie_word_embeddings=True`` and the reference's loss, logits and gradients."""
    adapter, config = tiny(request.param, tie_word_embeddings=True)
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp(request.param), config=config)
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, seq_len=12)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return request.param, adapter, directory, reference, out, (ids, mask, labels)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tied_stage_chain_equals_reference(chain_case, n):
    name, adapter, directory, reference, out, (ids, mask, labels) = chain_case
    config = reference.config
    the_plan = ppzoo.plan(directory, pp=n)
    stages = [
        build_stage(config, adapter, the_plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    logits = run_chain(stages, ids, attention_mask=mask)
    assert adapter.aux_loss(config, stages, mask) is None
    loss = causal_lm_loss(logits, labels)
    loss.backward()

    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    named = [(k, p) for s in stages for k, p in s.named_parameters()]
    tied = adapter.tied_weights(config)
    assert tied == {HEAD: EMBED}
    expected = {k for k, _ in reference.named_parameters()} | (set(tied) if n > 1 else set())
    assert sorted(k for k, _ in named) == sorted(expected)
    assert grad_mismatches(named, reference, tied=tied) == [], f"{name} with {n} stages"
    _assert_tied_gradient(stages, reference)


def _assert_tied_gradient(stages, reference):
    """The reference's one tied gradient is the first stage's embedding grad + the last stage's head grad."""
    first, last = stages[0], stages[-1]
    want = reference.model.embed_tokens.weight.grad
    if len(stages) == 1:
        assert first.lm_head.weight is first.model.embed_tokens.weight
        torch.testing.assert_close(first.model.embed_tokens.weight.grad, want, rtol=1e-5, atol=1e-6)
        return
    assert first.lm_head is None and last.model.embed_tokens is None
    torch.testing.assert_close(last.lm_head.weight, first.model.embed_tokens.weight, rtol=0, atol=0)
    got = first.model.embed_tokens.weight.grad + last.lm_head.weight.grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first.model.embed_tokens.weight.grad, want, atol=1e-4)  # one part alone is not it


# -- the distributed pipeline: optimizer steps keep the copies identical -----------------------------


def _train_case(directory, pp, schedule):
    reference = load_reference(directory)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    pipe = ppzoo.pipeline(
        directory, pp=pp, schedule=schedule, microbatches=4, device="cpu", attn_implementation="eager"
    )
    opt = torch.optim.SGD(pipe.parameters(), lr=0.5, momentum=0.9)
    params = dict(pipe.named_parameters())
    problems = []
    for step in range(STEPS):
        ref_opt.zero_grad()
        opt.zero_grad()
        for part in range(2):  # two steps accumulate into each update: earlier gradients are not summed again
            ids, mask, labels = batch(reference.config.vocab_size, batch_size=4, seed=2 * step + part)
            reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            pipe.step(ids, labels=labels, attention_mask=mask)
        want = reference.get_parameter(EMBED).grad
        for name in (EMBED, HEAD):
            if name in params and not torch.allclose(params[name].grad, want, rtol=1e-5, atol=1e-6):
                problems.append(
                    f"step {step}: {name}.grad differs from the tied reference grad by "
                    f"{(params[name].grad - want).abs().max().item():.3e}"
                )
        ref_opt.step()
        opt.step()
    # After the optimizer steps both copies are bitwise identical (or one parameter).
    last_rank = pipe.plan.stages[-1].rank
    head = params[HEAD].detach().clone() if HEAD in params else torch.zeros_like(reference.get_parameter(EMBED))
    if pipe.holds_last and HEAD not in params:
        head = params[EMBED].detach().clone()  # V placement: the head is the embedding itself
    dist.broadcast(head, src=last_rank)
    if pipe.holds_first and not torch.equal(head, params[EMBED].detach()):
        problems.append("after the optimizer steps the head copy differs from the embedding")
    if pipe.holds_first and not torch.allclose(params[EMBED], reference.get_parameter(EMBED), rtol=1e-5, atol=1e-6):
        problems.append("the trained embedding differs from the unsplit model's")
    names = [n for n, _ in pipe.named_parameters()]
    return {"problems": problems, "names": names, "v_tied": pipe.holds_first and pipe.holds_last and HEAD not in params}


def _rank_main(rank, world_size, directories, schedules):
    out = {}
    for arch, directory in directories.items():
        for schedule in schedules:
            try:
                out[(arch, schedule)] = _train_case(directory, world_size, schedule)
            except Exception:
                out[(arch, schedule)] = {"problems": [traceback.format_exc()], "names": [], "v_tied": False}
    return out


def _tied_dirs(tmp_path_factory, archs):
    dirs = {}
    for arch in archs:
        adapter = registry.adapters()[arch]
        config = adapter.tiny_config()
        config.tie_word_embeddings = True
        dirs[arch] = str(save_tiny_model(adapter, tmp_path_factory.mktemp(arch), config=config))
    return dirs


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    dirs = _tied_dirs(tmp_path_factory, ["llama", "gemma"])
    return run_distributed(_rank_main, 2, dirs, ("1F1B", "ZBVZeroBubble"), timeout_s=600)


@pytest.fixture(scope="module")
def pp4(tmp_path_factory):
    dirs = _tied_dirs(tmp_path_factory, ["llama"])
    return run_distributed(_rank_main, 4, dirs, ("1F1B", "ZBVZeroBubble"), timeout_s=600)


@pytest.mark.distributed
@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_tied_pp2(pp2, arch, schedule):
    for rank, per_rank in enumerate(pp2):
        assert per_rank[(arch, schedule)]["problems"] == [], f"rank {rank}"
    if schedule == "ZBVZeroBubble":
        # V placement: rank 0 holds the first and last stage, and the head is the embedding itself
        assert pp2[0][(arch, schedule)]["v_tied"]
        assert HEAD not in pp2[0][(arch, schedule)]["names"]


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_tied_pp4(pp4, schedule):
    for rank, per_rank in enumerate(pp4):
        assert per_rank[("llama", schedule)]["problems"] == [], f"rank {rank}"
    holders = [r for r, per_rank in enumerate(pp4) if HEAD in per_rank[("llama", schedule)]["names"]]
    assert holders == ([3] if schedule == "1F1B" else [])


# -- tie groups over any set of stages: a block several layers share -------------------------------
#: Zamba with three hybrid layers: one shared transformer block, tied from layer 1 to layers 2 and 4
SHARED = "model.layers.{}.shared_transf.feed_forward.down_proj.weight"
HYBRID = [1, 2, 4]


@pytest.fixture(scope="module")
def shared_block(tmp_path_factory):
    from ppzoo.testing.tiny_configs import tiny_config

    config = tiny_config("zamba")
    config.num_hidden_layers = 6
    config.layers_block_type = ["hybrid" if i in HYBRID else "linear_attention" for i in range(6)]
    adapter = registry.adapter_for(config)
    directory = save_tiny_model(adapter, tmp_path_factory.mktemp("zamba"), config=config)
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, seq_len=12)
    out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return adapter, directory, reference, out, (ids, mask, labels)


@pytest.mark.parametrize("n", [2, 3])
def test_a_block_shared_by_layers_on_three_stages_equals_reference(shared_block, n):
    """Each stage holding a layer of the shared block keeps a copy loaded from the one checkpoint
    key transformers saves (layer 1's); the copies' gradients sum to the unsplit model's (saving
    back is checked through the pipeline, in tests/test_native_families.py)."""
    from ppzoo.testing.chain_checks import _sync_tied_grads

    adapter, directory, reference, out, (ids, mask, labels) = shared_block
    config = reference.config
    tied = adapter.tied_weights(config)
    assert {tied[SHARED.format(i)] for i in HYBRID[1:]} == {SHARED.format(HYBRID[0])}
    assert HEAD in tied  # the head tied to the embedding as well: two groups
    # NOTE: one layer a hybrid layer per stage at 3 stages; at 2, layers 1 and 2 share a stage
    the_plan = ppzoo.plan(directory, pp=n, layers_per_stage=6 // n)
    stages = [
        build_stage(config, adapter, the_plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    holders = [
        s
        for s, stage in enumerate(stages)
        if any(SHARED.format(i) in dict(stage.named_parameters(remove_duplicate=False)) for i in HYBRID)
    ]
    assert holders == list(range(n))
    want = reference.get_parameter(SHARED.format(HYBRID[0]))
    copies = []
    for stage in stages:
        held = dict(stage.named_parameters(remove_duplicate=False))
        here = {id(held[SHARED.format(i)]): held[SHARED.format(i)] for i in HYBRID if SHARED.format(i) in held}
        assert len(here) == 1  # the layers of one stage use one tensor, as in the unsplit model
        copies += here.values()
    assert all(torch.equal(c, want) for c in copies)

    logits = run_chain(stages, ids, attention_mask=mask)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=0)
    parts = [c.grad.clone() for c in copies]
    _sync_tied_grads(stages, tied)
    scale = want.grad.abs().max()
    for part in parts:  # one stage's part alone is not the reference's gradient
        assert (part - want.grad).abs().max() > 1e-2 * scale
    torch.testing.assert_close(sum(parts[1:], parts[0]), want.grad, rtol=1e-5, atol=1e-6 * scale)
    named = [(k, p) for s in stages for k, p in s.named_parameters(remove_duplicate=False)]
    assert grad_mismatches(named, reference) == []


#: world size, stage ranks, layers per stage, the layers holding a member of the shared group
GROUPS = {
    "one stage a rank": (3, [0, 1, 2], 2, [1, 2, 4]),
    # stages 0 and 3 on rank 0, 1 and 4 on rank 1: two holders on each; rank 2 holds only the head
    "loop": (3, [0, 1, 2, 0, 1, 2], 2, [1, 3, 6, 9]),
    # stages 0 and 5 on rank 0, 2 and 3 on rank 2, the embedding and the head both on rank 0
    "V": (3, [0, 1, 2, 2, 1, 0], 2, [1, 4, 7, 10]),
}


class _Stage(torch.nn.Module):
    """A toy stage: an input embedding on the first, its layers (each with the shared block's
    parameter), a head on the last; its loss is a sum of per-layer terms."""

    def __init__(self, layers, first, last, shared):
        super().__init__()
        self.layers = torch.nn.ModuleDict({str(i): torch.nn.Module() for i in layers})
        for i in layers:
            if i in shared:
                self.layers[str(i)].shared = torch.nn.Linear(4, 4, bias=False)
            self.layers[str(i)].own = torch.nn.Linear(4, 4, bias=False)
        self.embed = torch.nn.Linear(4, 4, bias=False) if first else None
        self.head = torch.nn.Linear(4, 4, bias=False) if last else None


def _toy_loss(module, x):
    loss = 0
    for key, layer in module.layers.items():
        y = layer.own(x * (int(key) + 1))
        if hasattr(layer, "shared"):
            y = layer.shared(torch.tanh(y))
        loss = loss + y.pow(2).sum()
    for unit in (module.embed, module.head):
        if unit is not None:
            loss = loss + unit(x).sin().sum()
    return loss


def _toy_stages(stage_ranks, per_stage, shared, rank=None):
    torch.manual_seed(0)
    n = len(stage_ranks)
    every = [_Stage(range(s * per_stage, (s + 1) * per_stage), s == 0, s == n - 1, shared) for s in range(n)]
    # NOTE: every copy starts equal to its source, as loading from the source's checkpoint key gives
    with torch.no_grad():
        first = _param(dict(enumerate(every)), f"layers.{shared[0]}.shared.weight")
        for i in shared[1:]:
            _param(dict(enumerate(every)), f"layers.{i}.shared.weight").copy_(first)
        every[-1].head.weight.copy_(every[0].embed.weight)
    return {s: module for s, module in enumerate(every) if rank is None or stage_ranks[s] == rank}


def _tie_group_case(rank, world_size, case):
    from types import SimpleNamespace

    from ppzoo.mesh import Degrees, build_mesh
    from ppzoo.tied import TiedWeights

    _, stage_ranks, per_stage, shared = GROUPS[case]
    tied = {f"layers.{i}.shared.weight": f"layers.{shared[0]}.shared.weight" for i in shared[1:]}
    tied["head.weight"] = "embed.weight"
    plan_stages = [
        SimpleNamespace(
            index=s,
            rank=r,
            modules=(("embed",) if s == 0 else ())
            + tuple(f"layers.{i}" for i in range(s * per_stage, (s + 1) * per_stage))
            + (("head",) if s == len(stage_ranks) - 1 else ()),
        )
        for s, r in enumerate(stage_ranks)
    ]
    # the unsplit model: one tensor per group
    whole = _toy_stages(stage_ranks, per_stage, shared)
    for copy_, source in tied.items():
        for module in whole.values():
            if _has(module, copy_):
                owner, _, name = copy_.rpartition(".")
                setattr(module.get_submodule(owner), name, _param(whole, source))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    sum(_toy_loss(m, x) for m in whole.values()).backward()
    want = {source: _param(whole, source).grad for source in set(tied.values())}

    modules = _toy_stages(stage_ranks, per_stage, shared, rank=rank)
    mesh = build_mesh(Degrees(pp=world_size), torch.device("cpu"))
    weights = TiedWeights(tied, modules=modules, stages=plan_stages, pp_rank=rank, mesh=mesh)
    sum(_toy_loss(m, x) for m in modules.values()).backward()
    weights.sync_grads()
    problems = []
    for copy_, source in tied.items():
        held = [m.get_parameter(f) for m in modules.values() for f in (copy_, source) if _has(m, f)]
        if any(p is not held[0] for p in held):
            problems.append(f"{copy_} and {source} are two tensors on rank {rank}")
        for p in held:
            if not torch.allclose(p.grad, want[source], rtol=1e-6, atol=1e-6):
                problems.append(f"{copy_}/{source}: gradient on rank {rank} is not the unsplit model's")
    params = list({id(p): p for m in modules.values() for p in m.parameters()}.values())
    torch.optim.SGD(params, lr=0.1).step()
    values = {f: _param(modules, f).detach().clone() for f in (*tied, *tied.values()) if _param(modules, f) is not None}
    return {"problems": problems, "values": values}


def _has(module, fqn):
    try:
        module.get_parameter(fqn)
        return True
    except AttributeError:
        return False


def _param(modules, fqn):
    return next((m.get_parameter(fqn) for m in modules.values() if _has(m, fqn)), None)


def _tie_group_rank(rank, world_size, cases):
    return {case: _tie_group_case(rank, world_size, case) for case in cases}


@pytest.fixture(scope="module")
def tie_groups_run():
    """Every case of :data:`GROUPS`, one process group per world size."""
    out = {}
    for world_size in sorted({g[0] for g in GROUPS.values()}):
        cases = [case for case, g in GROUPS.items() if g[0] == world_size]
        per_rank = run_distributed(_tie_group_rank, world_size, cases, timeout_s=300)
        out.update({case: [r[case] for r in per_rank] for case in cases})
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(GROUPS))
def test_a_tie_group_over_any_stages_sums_its_gradients(tie_groups_run, case):
    """TiedWeights over three ranks, over loop placement (two holders of a group on one rank, tied
    there) and V placement: every holder's gradient is the unsplit model's, and after an
    optimizer step every copy is bitwise equal to the source."""
    results = tie_groups_run[case]
    assert [p for r in results for p in r["problems"]] == []
    _, _, _, shared = GROUPS[case]
    groups = {
        f"layers.{shared[0]}.shared.weight": [f"layers.{i}.shared.weight" for i in shared],
        "embed.weight": ["embed.weight", "head.weight"],
    }
    for members in groups.values():
        held = [r["values"][f] for r in results for f in members if f in r["values"]]
        assert len(held) >= 2 and all(torch.equal(v, held[0]) for v in held)
