"""Mixed precision (``pipeline(mixed_precision="bf16")``, ``ppzoo.precision``) against the unsplit model under autocast.

Two spawned gloo groups: 2 ranks for pp=2 (stages under autocast), 4 ranks for pp=2 × dp_shard=2
(FSDP2's mixed-precision policy) and pp=2 × tp=2 (autocast over tensor-parallel DTensors).
"""

from __future__ import annotations

import traceback

import pytest
import torch

import ppzoo
from ppzoo.precision import parse_mixed_precision
from ppzoo.testing.distributed import run_distributed
from ppzoo.testing.reference import batch, load_reference, save_tiny_model, tiny
from ppzoo.training_loop import data_parallel_rows

GLOBAL_BATCH = 8
CASES = {
    2: {"pp2": dict(microbatches=4)},
    4: {"pp2-dp_shard2": dict(microbatches=2, dp_shard=2), "pp2-tp2": dict(microbatches=2, tp=2)},
}
#: bfloat16 keeps 8 significant bits (relative rounding 2**-9); a few layers of it, and stage
#: boundaries rounded to bfloat16 (and, under FSDP2, a bfloat16 residual stream) stay within this
#: relative distance of the autocast reference (measured: up to 1.7e-2, sharded stages)
BF16_RTOL = 3e-2


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _distance(got, want):
    """Relative distance ‖got − want‖ / ‖want‖ (elementwise tolerances mislead for near-zero entries)."""
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def _case(directory, settings):
    reference = load_reference(directory)
    ids, mask, labels = batch(reference.config.vocab_size, batch_size=GLOBAL_BATCH, seed=7)
    with torch.no_grad():
        fp32_loss = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    pipe = ppzoo.pipeline(
        directory, pp=2, device="cpu", attn_implementation="eager", mixed_precision="bf16", **settings
    )
    part = [t[data_parallel_rows(pipe, GLOBAL_BATCH)] for t in (ids, mask, labels)]
    problems, distances = [], {}
    # NOTE: eval first: torch's schedule drops FSDP2 gradients when it sets up a new schedule
    logits = pipe.eval(part[0], attention_mask=part[1])
    if logits is not None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = reference(input_ids=part[0], attention_mask=part[1]).logits
        if logits.dtype != torch.bfloat16:
            problems.append(f"eval logits are {logits.dtype}, not bfloat16")
        elif _distance(logits, want) > BF16_RTOL:
            problems.append(f"eval logits: relative distance {_distance(logits, want):.2e}")
    loss = pipe.step(part[0], labels=part[2], attention_mask=part[1])
    if loss.dtype != torch.float32:
        problems.append(f"loss is {loss.dtype}")
    if loss.item() == fp32_loss.item():
        problems.append("loss equals the float32 loss exactly: nothing was computed in bfloat16")
    distances["loss"] = abs(loss.item() - out.loss.item()) / abs(out.loss.item())
    for name, param in pipe.named_parameters():
        if param.dtype != torch.float32 or param.grad is None or param.grad.dtype != torch.float32:
            problems.append(f"{name}: parameter {param.dtype}, grad {getattr(param.grad, 'dtype', None)}")
            continue
        distances[name] = _distance(_full(param.grad), reference.get_parameter(name).grad)
    problems += [f"{k}: relative distance {v:.2e} > {BF16_RTOL}" for k, v in distances.items() if v > BF16_RTOL]
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-3)
    optimizer.step()
    states = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    if not states or any(t.dtype != torch.float32 for t in states):
        problems.append(f"optimizer state dtypes {sorted({str(t.dtype) for t in states})}")
    if any(p.dtype != torch.float32 for group in optimizer.param_groups for p in group["params"]):
        problems.append("a parameter left float32 after the optimizer step")
    return {"problems": problems, "distances": distances}


def _rank_main(rank, world_size, directory):
    results = {}
    for label, settings in CASES[world_size].items():
        try:
            results[label] = _case(directory, settings)
        except Exception:
            results[label] = {"problems": [traceback.format_exc()]}
    return results


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    adapter, config = tiny("llama", tie_word_embeddings=True)
    return str(save_tiny_model(adapter, tmp_path_factory.mktemp("llama"), config=config))


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", sorted(CASES))
def test_bf16_loss_and_grads_match_unsplit_model_under_autocast(directory, world_size):
    """Loss, gradients and eval logits within bfloat16 tolerance; parameters, grads, optimizer state float32."""
    results = run_distributed(_rank_main, world_size, directory, timeout_s=600)
    for label in CASES[world_size]:
        for rank, per_rank in enumerate(results):
            assert per_rank[label]["problems"] == [], f"{label}, rank {rank}"
        worst = max(results[0][label]["distances"].items(), key=lambda kv: kv[1])
        print(f"{label}: largest relative distance {worst}")


def test_mixed_precision_values():
    assert parse_mixed_precision(None, dtype=torch.float32) is None
    for spelling in ("bf16", "BF16", "bfloat16", torch.bfloat16):
        assert parse_mixed_precision(spelling, dtype=torch.float32) is torch.bfloat16
    with pytest.raises(ValueError, match="mixed_precision='fp16' is not supported: float16 gradients need loss"):
        parse_mixed_precision("fp16", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"mixed_precision='int8' is not one of None, 'bf16'"):
        parse_mixed_precision("int8", dtype=torch.float32)
    with pytest.raises(ValueError, match="keeps float32 master parameters, but dtype=torch.bfloat16"):
        parse_mixed_precision("bf16", dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mixed_precision="fp16"), "mixed_precision='fp16' is not supported"),
        (dict(mixed_precision="bf16", dtype="bfloat16"), "keeps float32 master parameters"),
        (dict(activation_checkpointing="some"), "activation_checkpointing='some' is not one of"),
        (dict(activation_checkpointing=0), "activation_checkpointing=0 is not one of"),
        (dict(compile="yes"), "compile must be True or False, got 'yes'"),
    ],
)
def test_bad_values_are_refused_before_any_communication(directory, kwargs, message):
    """No process group exists here: the refusal comes before ppzoo would need one."""
    with pytest.raises(ValueError, match=message):
        ppzoo.pipeline(directory, pp=2, device="cpu", **kwargs)
