"""The image step check: tiny vision-language models saved as their released classes save them,
and on each rank a step with images, one text-only and ``eval`` against the unsplit model."""

from __future__ import annotations

from typing import Any

import torch

from ppzoo.testing.image_batches import _text_only, image_batch
from ppzoo.testing.tiny_vision_configs import tiny_vision_config

__all__ = ["save_tiny_vision_model", "vision_step_problems"]


def save_tiny_vision_model(model_type: str, directory: str, *, seed: int = 0) -> Any:
    """Save the randomly initialised tiny ``model_type`` (sharded, as released checkpoints are); its config."""
    config = tiny_vision_config(model_type)
    _save_config_model(config, directory, seed=seed)
    return config


def _save_config_model(config: Any, directory: str, *, seed: int = 0) -> None:
    """Save a randomly initialised model of ``config``'s class, in shards of 40 KB."""
    from ppzoo.meta import model_class
    from ppzoo.testing.reference import perturb_zero_init

    torch.manual_seed(seed)
    model = model_class(config).from_config(config, dtype=torch.float32)
    perturb_zero_init(model, seed)
    model.save_pretrained(directory, max_shard_size="40KB")


def vision_step_problems(
    rank: int, world_size: int, directories: dict[str, str], schedule: str = "1F1B"
) -> dict[str, list[str]]:
    """Run on each of ``world_size`` ranks: for each tiny model saved in ``directories``, a step with
    images, one text-only, and ``eval`` against the unsplit model; the differences found, by type."""
    import ppzoo
    from ppzoo.testing.reference import grad_mismatches, load_reference

    found: dict[str, list[str]] = {}
    for model_type, directory in directories.items():
        problems = found.setdefault(model_type, [])
        reference = load_reference(directory)
        pipe = ppzoo.pipeline(
            directory,
            pp=world_size,
            microbatches=2,
            schedule=schedule,
            dtype=torch.float32,
            attn_implementation="eager",
        )
        text = _text_only(image_batch(reference), reference.config.model_type)
        for what, batch in (("images", image_batch(reference)), ("text", text)):
            # NOTE: train mode against train mode: the vision tower runs whole, before the schedule, on
            # the first stage's rank, so its dropout (drop path) draws what the unsplit model's does
            # when every rank seeds torch alike before the step
            reference.train()
            reference.zero_grad()
            torch.manual_seed(_STEP_SEED)
            expected = reference(**batch)
            expected.loss.backward()
            reference.eval()
            with torch.no_grad():
                evaluated = reference(**batch).logits
            for p in pipe.parameters():
                p.grad = None
            ids, labels = batch.pop("input_ids"), batch.pop("labels")
            # NOTE: eval before and after the step: each must set the tower's mode (dropout) itself
            for when in ("before", "after"):
                if when == "after":
                    torch.manual_seed(_STEP_SEED)
                    loss = float(pipe.step(ids, labels=labels, **batch))
                    if abs(loss - expected.loss.item()) > 1e-5 * max(1.0, abs(loss)):
                        problems.append(f"{what}: loss {loss} != {expected.loss.item()}")
                    tied = pipe.adapter.tied_weights(pipe.config)
                    problems += [f"{what}: {b}" for b in grad_mismatches(pipe.named_parameters(), reference, tied=tied)]
                logits = pipe.eval(ids, **batch)
                if logits is not None and not torch.allclose(logits, evaluated, rtol=1e-5, atol=1e-5):
                    diff = (logits - evaluated).abs().max().item()
                    problems.append(f"{what}: eval logits {when} the step differ by {diff:.3e}")
    return found


#: the seed every rank and the reference give torch before a step (the vision tower's dropout)
_STEP_SEED = 1234
