"""Activation memory per pipeline stage, with and without activation checkpointing.

    python -m benchmarks.activation_memory --out benchmarks/results/activation-memory.json

Each stage of a pp=2 split of a generated Llama checkpoint is built in this one process (as
``ppzoo.pipeline`` builds it on its rank) and runs one microbatch forward and backward: the first
stage from token ids, the last from hidden states to the loss. Its gradients exist beforehand (a
warm-up step, then zeroed in place), so what the measurement sees is activations and temporaries.

How memory is counted (CPU has no allocator statistics): a ``TorchDispatchMode`` sees every
tensor every operation returns, including those of the backward and of the recomputation; each
new storage adds its bytes when it first appears and gives them back when it is freed (a weak
reference to the storage). Reported per stage and mode:

- **held**: bytes alive when the forward returns (what is kept for the backward, plus the output);
- **peak**: the most bytes alive at any time during forward and backward.

The gradients of every mode are checked equal to those without checkpointing before anything is
reported.
"""

from __future__ import annotations

import argparse
import weakref
from pathlib import Path
from typing import Any

from benchmarks.common import command_line, float32_checkpoint, human_bytes, start_single_process, table, write_json

#: activation_checkpointing= values compared (None: keep every activation)
MODES = (None, "selective", "full")


class LiveBytes:
    """Bytes of the storages created under it that are still alive, and their peak (a dispatch mode)."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def _track(self, tensor: Any, inputs: set[int]) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        # NOTE: an output sharing an input's storage (a view, an in-place update) allocated nothing
        if key in self._seen or key in inputs or storage.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def mode(self) -> Any:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = {
                    t.untyped_storage().data_ptr()
                    for t in tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor) and t.device.type != "meta"
                }
                for leaf in tree_leaves(out):
                    tracker._track(leaf, inputs)
                return out

        return _Mode()


def _stages(directory: Path, seq_len: int, mode: str | None) -> tuple[Any, list[Any]]:
    import torch

    import ppzoo
    from ppzoo import registry
    from ppzoo.checkpoint import Checkpoint
    from ppzoo.config import load_config
    from ppzoo.parallelize import apply_activation_checkpointing, parse_activation_checkpointing, stage_layers
    from ppzoo.stage import build_stage

    config = load_config(directory)
    adapter = registry.adapter_for(config)
    plan = ppzoo.plan(config, pp=2, schedule="1F1B", dtype=torch.float32, seq_len=seq_len)
    stages = []
    for index in range(plan.num_stages):
        stage = build_stage(
            config,
            adapter,
            plan,
            index,
            checkpoint=Checkpoint(directory),
            dtype=torch.float32,
            attn_implementation="sdpa",
        )
        if mode is not None:
            apply_activation_checkpointing(stage_layers(stage, adapter, config), parse_activation_checkpointing(mode))
        stages.append(stage)
    return plan, stages


def _run(stage: Any, index: int, last: bool, inputs: Any, labels: Any, grad_out: Any) -> Any:
    from ppzoo.loss import causal_lm_loss

    x = inputs if index == 0 else inputs.detach().requires_grad_()
    out = stage(x)
    return out, (lambda: causal_lm_loss(out, labels).backward()) if last else (lambda: out.backward(grad_out))


def measure(directory: Path, *, seq_len: int, batch_size: int) -> list[dict[str, Any]]:
    """Held and peak activation bytes of each stage under each mode (gradients checked equal)."""
    import torch

    rows, reference = [], {}
    for mode in MODES:
        plan, stages = _stages(directory, seq_len, mode)
        config = stages[0].config
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
        hidden = torch.randn(batch_size, seq_len, config.hidden_size, generator=torch.Generator().manual_seed(1))
        for index, stage in enumerate(stages):
            last = index == plan.num_stages - 1
            grad_out = torch.randn(batch_size, seq_len, config.hidden_size, generator=torch.Generator().manual_seed(2))
            inputs = ids if index == 0 else hidden
            _, backward = _run(stage, index, last, inputs, ids, grad_out)
            backward()  # warm-up: gradients allocated once, then zeroed in place
            stage.zero_grad(set_to_none=False)
            tracker = LiveBytes()
            with tracker.mode():
                out, backward = _run(stage, index, last, inputs, ids, grad_out)
                held = tracker.live
                del out
                backward()
            grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
            if mode is None:
                reference[index] = grads
            else:
                for name, grad in grads.items():
                    torch.testing.assert_close(grad, reference[index][name], rtol=1e-6, atol=1e-7)
            layers = list(plan.stages[index].layers)
            rows.append(
                {
                    "stage": index,
                    "layers": f"{layers[0]}-{layers[-1]}" if layers else "-",
                    "mode": mode or "none",
                    "held": held,
                    "peak": tracker.peak,
                }
            )
    for row in rows:
        base = next(r for r in rows if r["stage"] == row["stage"] and r["mode"] == "none")
        row["held/none"] = row["held"] / base["held"]
        row["peak/none"] = row["peak"] / base["peak"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="medium", help="a shape of benchmarks.common.SHAPES")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2, help="the microbatch size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ppzoo-bench"), help="where checkpoints are generated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    info = start_single_process(args.threads)
    directory = float32_checkpoint(args.root, args.shape)
    rows = measure(directory, seq_len=args.seq_len, batch_size=args.batch_size)
    shown = [{**r, "held": human_bytes(r["held"]), "peak": human_bytes(r["peak"])} for r in rows]
    print(f"{args.shape}, seq_len {args.seq_len}, microbatch {args.batch_size}, float32, sdpa")
    print(table(shown, ["stage", "layers", "mode", "held", "held/none", "peak", "peak/none"], floats="{:.2f}"))
    write_json(args.out, {"command": command_line("benchmarks.activation_memory"), "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
