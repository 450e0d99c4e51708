"""Conformance checks of what a built stage holds from a checkpoint: each stage reads exactly its
own tensors, once, from the shards that hold them, and its buffers after meta init equal the
``from_pretrained`` model's.
"""

from __future__ import annotations

from typing import Any

import torch

from ppzoo.adapter import Adapter
from ppzoo.capabilities import Capability
from ppzoo.checkpoint import Checkpoint
from ppzoo.meta import meta_model
from ppzoo.planner import plan
from ppzoo.stage import build_stage
from ppzoo.testing.harness import _build_stages, _fail_if, _owners, _tiny_checkpoint, resolving_to

__all__ = ["check_buffers_after_meta_init", "check_stage_reads"]


# -- per-stage reads ---------------------------------------------------------------------------
def _key_owners(adapter: Adapter, config: Any, keys: set[str]) -> dict[str, set[str]]:
    """``{checkpoint key: the parameter FQNs it converts to}``: by transformers' conversion rules;
    a key those rules turn into no parameter belongs to the parameters whose key map names it."""
    from ppzoo.checkpoint.conversion import loading_plan
    from ppzoo.checkpoint.tensors import persistent_tensors

    model = meta_model(config)
    fqns = [fqn for fqn, *_ in persistent_tensors(model)]
    converted = loading_plan(model, keys, fqns)
    owners: dict[str, set[str]] = {}
    for fqn, group in converted.items():
        for key in group.keys:
            owners.setdefault(key, set()).add(fqn)
    key_map = adapter.key_map(config)
    for fqn in fqns:
        mapped = key_map.sources(fqn, lambda k: k in converted or k in keys)
        for key in mapped if mapped != [fqn] else ():
            if key in keys and key not in owners:
                owners.setdefault(key, set()).add(fqn)
    return owners


def check_stage_reads(adapter: Adapter) -> None:
    """Each stage reads exactly its own tensors from a sharded checkpoint, each once, and opens
    only the shards that hold them; together the stages read every tensor (for ``moe``: per-expert
    keys, converted into the fused parameters). A checkpoint key belongs to the stages holding the
    parameters it converts to (transformers' conversion rules, or the adapter's key map)."""
    config = adapter.tiny_config()
    tied = adapter.tied_weights(config)
    problems = []
    renamed: set[str] = set()  # keys read that are no parameter's name: converted by the key map
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        everything = set(Checkpoint(directory).weight_map)
        owners = _key_owners(adapter, config, everything)
        made_of: dict[str, set[str]] = {}
        for key, fqns in owners.items():
            for fqn in fqns:
                made_of.setdefault(fqn, set()).add(key)
        for pp, schedule in ((2, "1F1B"), (4, "1F1B")):
            the_plan = plan(directory, pp=pp, schedule=schedule)
            read_by_any: set[str] = set()
            for stage in the_plan.stages:
                checkpoint = Checkpoint(directory)
                reads: list[str] = []
                whole, part = checkpoint._get_tensor, checkpoint._get_slice

                # NOTE: every read of the loader, whole tensor or part, passes one of these two
                def recording(handle, key, _reads=reads, _original=whole):
                    _reads.append(key)
                    return _original(handle, key)

                def recording_part(handle, key, where, _reads=reads, _original=part):
                    _reads.append(key)
                    return _original(handle, key, where)

                checkpoint._get_tensor, checkpoint._get_slice = recording, recording_part
                built = build_stage(
                    config, adapter, the_plan, stage.index, checkpoint=checkpoint, attn_implementation="eager"
                )
                renamed |= set(reads) - {name for name, _ in built.named_parameters(remove_duplicate=False)}
                label = f"pp={pp} {schedule} stage {stage.index}"
                own = {k for k, fqns in owners.items() if any(_owners(fqn, stage.modules) for fqn in fqns)}
                # NOTE: a checkpoint saved with tied embeddings stores only the source; the stage
                # holding the copy reads the source's keys, and nothing else outside its modules.
                borrowed = {
                    k
                    for cp, src in tied.items()
                    if _owners(cp, stage.modules) and not made_of.get(cp)
                    for k in made_of.get(src, ())
                }
                twice = sorted({k for k in reads if reads.count(k) > 1})
                if twice:
                    problems.append(f"{label} read {twice} more than once")
                foreign = sorted(set(reads) - own - borrowed)
                if foreign:
                    problems.append(f"{label} read tensors of other stages: {foreign}")
                missed = sorted(own - set(reads))
                if missed:
                    problems.append(f"{label} did not read its own tensors {missed}")
                shards = {checkpoint.weight_map[k] for k in reads}
                extra_files = sorted(set(checkpoint.files_opened) - shards)
                if extra_files:
                    problems.append(f"{label} opened shards {extra_files} that hold none of its tensors")
                read_by_any |= set(reads)
            unread = sorted(everything - read_by_any)
            if unread:
                problems.append(f"pp={pp} {schedule}: no stage read {unread}")
        tied_keys = set(tied.values())
        if Capability.MOE in adapter.capabilities and not renamed - tied_keys:
            problems.append(
                "declares 'moe' but every tensor read is named like its parameter: the per-expert checkpoint keys "
                "were not converted by key_map(), so this check did not test it"
            )
    _fail_if(problems, f"adapter {adapter.name!r}: per-stage reads")


# -- buffers ------------------------------------------------------------------------------------------
def check_buffers_after_meta_init(adapter: Adapter) -> None:
    """Every buffer of every built stage (RoPE ``inv_freq``, embedding scales, ...) equals the
    ``from_pretrained`` model's, in value and dtype, in fp32 and bf16; no buffer is left out."""
    problems = []
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        from transformers import AutoModelForCausalLM

        for dtype in (torch.float32, torch.bfloat16):
            reference = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager")
            want = dict(reference.named_buffers())
            for pp in (1, 3):  # one stage holding everything; first, middle and last stages
                stages = _build_stages(adapter, reference.config, plan(directory, pp=pp), directory, dtype=dtype)
                seen = set()
                for index, stage in enumerate(stages):
                    for name, buf in stage.named_buffers():
                        seen.add(name)
                        label = f"{str(dtype)[6:]} pp={pp} stage {index}: buffer {name!r}"
                        ref = want.get(name)
                        if ref is None:
                            problems.append(f"{label} is not in the Hugging Face model")
                        elif buf.dtype != ref.dtype or buf.shape != ref.shape:
                            problems.append(
                                f"{label} is {buf.dtype} {tuple(buf.shape)}, reference {ref.dtype} {tuple(ref.shape)}"
                            )
                        elif not torch.equal(buf, ref):
                            problems.append(
                                f"{label} differs from the reference by {(buf.double() - ref.double()).abs().max().item():.3e}"
                            )
                missing = sorted(set(want) - seen)
                if missing:
                    problems.append(f"{str(dtype)[6:]} pp={pp}: no stage holds buffers {missing}")
    _fail_if(problems, f"adapter {adapter.name!r}: buffers after meta init")
