"""What validation works with: the run settings rules see, the problems they report, the error.

Every rule, the core's own (:mod:`ppzoo.rules`) and every plugin's, is an implementation of the
``ppzoo_validate`` hook: it gets the config, its adapter, the plan (None before the split) and the
:class:`Settings`, and returns :class:`Problem` objects. ``ppzoo.registry.validate`` collects them
all and raises one :class:`ValidationError` listing every problem.

A problem's ``code`` is stable: tests, tools and the conformance kit compare codes, never message
text. :data:`CODES` is the table of the codes ppzoo's own rules and built-in adapters report;
a plugin names its own codes, prefixed with its name (``"cohere-logit-scale"``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CODES", "Problem", "Settings", "ValidationError"]

#: every code ppzoo's own rules and built-in adapters report, with what it means
CODES: dict[str, str] = {
    # the config, whatever the adapter (Adapter.validate)
    "encoder-decoder": "the config is an encoder-decoder model; ppzoo pipelines decoder-only causal LMs",
    "unknown-layer-type": "config.layer_types names an attention type the adapter builds no mask for",
    "sliding-window-unset": "some layers are sliding_attention but sliding_window is not set",
    "quantized-unsupported": "the checkpoint's weights are quantized by a method ppzoo does not dequantize (it reads fp8 and mxfp4)",
    # built-in adapters
    "bidirectional-attention": "bidirectional attention makes the model an encoder, not a causal LM",
    "experts-per-token": "num_experts_per_tok is not between 1 and the number of experts",
    "generic-forward-step": "the generic adapter sees a step around the layers it would skip (a scale, multiplier, soft-cap, ...)",
    "generic-moe": "the generic adapter sees a mixture of experts, which needs an adapter of its own",
    "generic-per-layer-type-rope": "the generic adapter sees per-layer-type RoPE, which needs an adapter of its own",
    "generic-sliding-window": "sliding_window without layer_types: the model's forward decides which layers slide",
    "generic-layout": "the model cannot be built, or is not laid out as embed_tokens / layers / norm / lm_head",
    # the native adapter (Hugging Face's own forward, steered; see docs/zoo.md)
    "native-moe": "a mixture of experts whose router aux loss ppzoo cannot read from the forward, so cannot add per stage",
    "native-config-size": "a size the planner reads (hidden_size, num_attention_heads, ...) is missing or varies per layer",
    "native-build": "the config does not build",
    "native-round-trip": "the CausalLM saves its config under a model type AutoModelForCausalLM cannot load",
    "native-layers": "no single ModuleList of num_hidden_layers layers, nor of another layer count of the config (num_layers)",
    "native-loss": "the CausalLM computes a loss other than transformers' causal-LM loss",
    "native-trace": "the forward runs neither on the meta device nor on a copy with constant weights",
    "native-layer-order": "the layers are not each called once, in order (looped depth, skipped layers)",
    "native-layer-attribute": "the forward reads a decoder layer's submodule or parameter outside the layer (X-MOD's language adapters)",
    "native-batch-rows": "the forward mixes the rows of a batch (Doge's router), so microbatches give other results than the whole batch",
    "native-unused-module": "a module holds parameters the text forward never calls (outside a vision-language model's image side)",
    "vision-in-layers": "a vision-language model whose language model takes more than the embeddings for its layers (Qwen3-VL's deepstack features)",
    "native-between-layers": "a module runs between the layers or on both sides (a shared block)",
    "native-shared-parameters": "one parameter used in several places",
    "native-direct-parameter": "a parameter held by the base model itself, outside every module (one that only a vision-language model's image code reads joins its image side)",
    "native-layer-input": "a layer receives something besides the hidden states that only another stage has and that cannot be carried across the boundary",
    "native-split-backward": "a zero-bubble schedule (split backward) for a model whose layer uses a parameter again downstream of its first use (Gemma 3n's AltUp router), which torch's weight pass cannot differentiate",
    "native-head-input": "the logits read something besides the last layer's output",
    "native-input-module": "an input module whose output shape ppzoo cannot stand in for",
    "native-layer-output": "layers return something other than a tensor or a tuple/list",
    "native-tied": "a tie other than output-to-input, layer-to-earlier-layer (a block several layers share) or within one side",
    "native-checkpoint-keys": "transformers' checkpoint key conversion fails on the model, or does not read back what it saves",
    # the split
    "stages-uneven": "the number of stages is not a multiple of pp",
    "stages-per-rank-mismatch": "stages_per_rank disagrees with the split layers_per_stage or stage_modules makes",
    "stages-exceed-layers": "more stages than the model has layers",
    "schedule-stages-per-rank": "the schedule needs another number of stages per rank (one; exactly two for V schedules)",
    # microbatches
    "microbatches-too-few": "the schedule needs at least as many microbatches as stages",
    "microbatches-not-multiple": "an interleaved schedule runs microbatches in rounds of pp",
    # parallelism inside a stage
    "cp-unsupported": "context parallelism (cp > 1) is not implemented",
    "tp-divisibility": "tp does not divide the attention heads, key/value heads or MLP width",
    "tp-plan-missing": "tp > 1, but the adapter has no tensor-parallel plan and no parallelize_fn is given",
    "tied-v-placement-dp": "the tied embedding and head share one rank (V placement) and cannot be sharded over dp",
}

_CODE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Problem:
    """One reason a config cannot run as asked.

    Attributes:
        code: a stable kebab-case id (``"tp-divisibility"``); see :data:`CODES`.
        message: one sentence for people: what is wrong, with the values seen, and what to do.
    """

    code: str
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not _CODE.match(self.code):
            raise ValueError(
                f"problem code {self.code!r} is not kebab-case (lowercase words joined by '-', e.g. 'mymodel-head-size')"
            )
        if not isinstance(self.message, str) or not self.message:
            raise ValueError(f"problem {self.code!r} needs a message (one sentence for people), got {self.message!r}")


@dataclass(frozen=True)
class Settings:
    """The run settings the rules see; a field is None where it is not known yet.

    ``ppzoo.plan`` knows the pipeline settings; ``ppzoo.pipeline`` knows them all. ``ppzoo plan``
    on the command line knows no microbatch count unless given, and no mesh degrees but ``pp``.

    Attributes:
        pp: pipeline-parallel degree.
        schedule: the canonical schedule name, or a ``.csv`` path.
        stages_per_rank: stages per rank as asked (None: the schedule's default, or from the split).
        num_stages: the stages the split makes (``pp`` × stages per rank, from ``layers_per_stage``
            or ``stage_modules``).
        microbatches: microbatches per step (None: the number of stages, which always fits).
        dp_replicate: replicated data-parallel degree.
        dp_shard: sharded (FSDP) data-parallel degree.
        cp: context-parallel degree.
        tp: tensor-parallel degree.
        custom_parallelize: a ``parallelize_fn`` replaces ppzoo's tensor parallel + FSDP2.
    """

    pp: int | None = None
    schedule: str | None = None
    stages_per_rank: int | None = None
    num_stages: int | None = None
    microbatches: int | None = None
    dp_replicate: int | None = None
    dp_shard: int | None = None
    cp: int | None = None
    tp: int | None = None
    custom_parallelize: bool | None = None

    @property
    def dp(self) -> int | None:
        """Data-parallel ranks (``dp_replicate × dp_shard``); None when either is unknown."""
        if self.dp_replicate is None or self.dp_shard is None:
            return None
        return self.dp_replicate * self.dp_shard


class ValidationError(ValueError):
    """A config, plan or settings break one or more rules; ``problems`` holds them all.

    The message is the problem's own when there is one, else a heading and one line per problem.
    """

    def __init__(self, problems: Sequence[Problem], *, model_type: str | None = None):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0].message
        else:
            head = f"ppzoo cannot run this {model_type or 'model'} as configured:"
            message = head + "".join(f"\n  - {p.message}" for p in self.problems)
        super().__init__(message)

    @property
    def codes(self) -> list[str]:
        """The problems' codes, in order."""
        return [p.code for p in self.problems]
