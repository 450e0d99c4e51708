"""The generation conformance check: stages chained in one process generate what the unsplit
Hugging Face model's ``generate`` does, token for token (:mod:`ppzoo.generation`).
"""

from __future__ import annotations

import torch

from ppzoo.adapter import Adapter
from ppzoo.planner import plan
from ppzoo.testing.harness import SEQ_LEN, _build_stages, _fail_if, _tiny_checkpoint, resolving_to
from ppzoo.testing.reference import batch, load_reference

__all__ = ["check_generate"]

#: tokens the generate check asks for: with its prompts, more than every tiny sliding window
GENERATE_TOKENS = 8
#: the seed of the generate check's sampling (``torch.manual_seed`` for the reference)
GENERATE_SEED = 4321
#: sampling settings that put every transformers warper ppzoo passes on to work
SAMPLING = dict(temperature=0.8, top_k=20, top_p=0.9)


def _eos_reference(reference, ids, mask, greedy, length: int):
    """An eos token that ends one row early while another goes on, and the reference's output with it.

    NOTE: picked from the greedy output itself, so that the check exercises eos whatever the
    random tiny model prefers; None when no generated token does both.
    """
    for row in range(ids.shape[0]):
        for step in range(1, GENERATE_TOKENS - 2):
            eos = int(greedy[row, length + step])
            want = reference.generate(
                ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=False, eos_token_id=eos
            )
            new = want[:, length:]
            # NOTE: a row whose eos is not its last token was padded while another row went on
            if bool((new[:, :-1] == eos).any()):
                return eos, want
    return None, None


def check_generate(adapter: Adapter) -> None:
    """Stages chained in one process generate what the unsplit Hugging Face model's ``generate``
    does, token for token, from left-padded prompts of different lengths (fp32, eager attention):
    greedy for 1, 2 and 4 stages, the batch in one microbatch and in several; a row that ends at
    its eos token while the others go on; and sampling with temperature, top-k and top-p from the
    generator state ``torch.manual_seed(seed)`` gives (ppzoo's ``seed=``). See :mod:`ppzoo.generation`."""
    from ppzoo.generation import generate_chain

    problems = []
    with resolving_to(adapter), _tiny_checkpoint(adapter) as directory:
        reference = load_reference(directory)
        config = reference.config
        # NOTE: transformers' own generate fails with the router aux loss on and a padding mask
        # (the loss is computed from the cached step's router logits against the whole mask);
        # the router logits do not change the logits
        config.output_router_logits = False
        ids, mask, _ = batch(config.get_text_config().vocab_size, seq_len=SEQ_LEN)
        length = ids.shape[1]
        with torch.no_grad():
            greedy = reference.generate(ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=False)
            eos, ended = _eos_reference(reference, ids, mask, greedy, length)
            torch.manual_seed(GENERATE_SEED)
            sampled = reference.generate(
                ids, attention_mask=mask, max_new_tokens=GENERATE_TOKENS, do_sample=True, **SAMPLING
            )
        if eos is None:
            problems.append("no generated token of the tiny model ends one row early while another goes on")
        if torch.equal(sampled, greedy):
            problems.append("sampling gives the greedy output for the tiny model, so it is not tested")

        def run(stages, label, want, **kwargs):
            got = generate_chain(
                stages,
                ids,
                mask,
                adapter=adapter,
                config=config,
                source=directory,
                max_new_tokens=GENERATE_TOKENS,
                **kwargs,
            )
            if not torch.equal(got, want):
                problems.append(f"{label}: ids differ from Hugging Face's generate:\n{got.tolist()}\n{want.tolist()}")

        for n in (1, 2, 4):
            stages = _build_stages(adapter, config, plan(directory, pp=n), directory)
            run(stages, f"{n} stages, greedy", greedy)
            if n == 2:
                run(stages, "2 stages, greedy, one microbatch", greedy, microbatches=1)
                if eos is not None:
                    run(stages, f"2 stages, greedy, eos {eos}", ended, eos_token_id=eos)
            if n > 1:
                run(stages, f"{n} stages, sampling {SAMPLING}", sampled, do_sample=True, seed=GENERATE_SEED, **SAMPLING)
    _fail_if(problems, f"adapter {adapter.name!r}: generation vs Hugging Face")
