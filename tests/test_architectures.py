"""What is particular to each built-in architecture: tiny configs, forward overrides, buffers, validation.

That each architecture split into 1-4 stages and chained in one process is the Hugging Face model
(loss, logits, every gradient) is the conformance kit's stage chain (``tests/test_conformance.py``);
with the MoE aux loss on it is in ``tests/test_aux_loss.py``, with tied embeddings in ``tests/test_tied.py``.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import ppzoo
from ppzoo import registry
from ppzoo.adapter import Adapter
from ppzoo.checkpoint import Checkpoint
from ppzoo.config import load_config
from ppzoo.layout import SLIDING
from ppzoo.registry import ValidationError
from ppzoo.stage import build_stage, run_chain
from ppzoo.testing.reference import batch, load_reference, save_tiny_model, tiny
from ppzoo.validation import Problem

AUX = {"output_router_logits": True, "router_aux_loss_coef": 0.5}
#: case id → (adapter name, config overrides)
CASES = {
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "mixtral": ("mixtral", AUX),
    "qwen2_moe": ("qwen2_moe", AUX),
    "qwen3_moe": ("qwen3_moe", AUX),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}
SEQ_LEN = 12


def chain(directory, n, ids, mask, adapter=None):
    config = load_config(directory)
    adapter = adapter or registry.adapter_for(config)
    plan = ppzoo.plan(directory, pp=n)
    stages = [
        build_stage(config, adapter, plan, i, checkpoint=Checkpoint(directory), attn_implementation="eager")
        for i in range(n)
    ]
    return stages, run_chain(stages, ids, attention_mask=mask)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(case_id)`` → ``(adapter, config, directory)``: each tiny model is saved once per module."""
    cache = {}

    def get(case_id):
        if case_id not in cache:
            name, overrides = CASES[case_id]
            adapter, config = tiny(name, **overrides)
            cache[case_id] = adapter, config, save_tiny_model(adapter, tmp_path_factory.mktemp(case_id), config=config)
        return cache[case_id]

    return get


@pytest.mark.parametrize("case_id", ["gemma", "gemma2", "gemma3_text", "llama-tied", "qwen2-tied"])
def test_tied_models_are_saved_without_lm_head(case_id, saved):
    adapter, config, directory = saved(case_id)
    assert "tied_embeddings" in adapter.capabilities or case_id.endswith("-tied")
    assert adapter.tied_weights(config) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not Checkpoint(directory).has("lm_head.weight")  # loading fills the head from the embedding


@pytest.mark.parametrize("case_id", ["gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_sliding_window_is_shorter_than_the_sequence(case_id, saved):
    """The tiny configs exercise the window: the same weights with a long window give other logits."""
    adapter, config, directory = saved(case_id)
    assert "sliding_window" in adapter.capabilities
    assert SLIDING in adapter.layer_types(config) and config.sliding_window < SEQ_LEN
    ids, mask, _ = batch(config.vocab_size, seq_len=SEQ_LEN)
    with torch.no_grad():
        windowed = load_reference(directory)(input_ids=ids, attention_mask=mask).logits
        unwindowed = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager", sliding_window=64
        )(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(windowed, unwindowed, atol=1e-4)


@pytest.mark.parametrize(
    ("case_id", "pieces"),
    [("granite", ["embed"]), ("granite", ["logits"]), ("gemma2", ["logits"]), ("gemma3_text", ["logits"])],
    ids=["granite-embedding_multiplier", "granite-logits_scaling", "gemma2-softcap", "gemma3-softcap"],
)
def test_forward_overrides_change_the_result(case_id, pieces, saved):
    """Negative control: the same adapter with one forward piece reset to the base's is not the model."""
    adapter, config, directory = saved(case_id)
    plain = type("Plain", (type(adapter),), {piece: getattr(Adapter, piece) for piece in pieces})()
    ids, mask, _ = batch(config.vocab_size, seq_len=SEQ_LEN)
    with torch.no_grad():
        want = load_reference(directory)(input_ids=ids, attention_mask=mask).logits
        _, right = chain(directory, 2, ids, mask)
        _, wrong = chain(directory, 2, ids, mask, adapter=plain)
    torch.testing.assert_close(right, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(wrong, want, atol=1e-3)


def test_gemma_embed_scale_is_recreated_after_meta_init(saved):
    _, config, directory = saved("gemma")
    stage = chain(directory, 2, *batch(config.vocab_size)[:2])[0][0]
    scale = stage.model.embed_tokens.embed_scale
    assert scale.device.type == "cpu" and float(scale) == pytest.approx(config.hidden_size**0.5)


def test_gemma3_ropes_differ_per_layer_type(saved):
    adapter, config, directory = saved("gemma3_text")
    stage = chain(directory, 1, *batch(config.vocab_size)[:2])[0][0]
    hidden = torch.zeros(1, SEQ_LEN, config.hidden_size)
    pos = torch.arange(SEQ_LEN).unsqueeze(0)
    ropes = adapter.position_embeddings(stage.model, hidden, pos, {"full_attention", "sliding_attention"})
    assert not torch.allclose(ropes["full_attention"][0], ropes["sliding_attention"][0])


# -- validation --------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once():
    _, config = tiny("gemma3_text", use_bidirectional_attention=True, is_encoder_decoder=True, sliding_window=None)
    with pytest.raises(ValidationError) as exc:
        registry.validate(config)
    assert exc.value.codes == ["encoder-decoder", "sliding-window-unset", "bidirectional-attention"]
    assert [p.message for p in exc.value.problems] == [
        "gemma3_text is an encoder-decoder model; ppzoo pipelines decoder-only causal LMs",
        "layer_types has sliding_attention layers but sliding_window is not set",
        "use_bidirectional_attention=True makes Gemma 3 an encoder (EmbeddingGemma); ppzoo pipelines causal LMs, "
        "set use_bidirectional_attention=False",
    ]


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_top_k_beyond_the_experts_is_refused(name):
    _, config = tiny(name, num_experts_per_tok=5)
    with pytest.raises(ValidationError) as exc:
        registry.validate(config)
    assert exc.value.problems == [
        Problem("experts-per-token", "num_experts_per_tok=5 must be between 1 and the 4 experts per layer")
    ]


@pytest.mark.parametrize("name", ["gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe", "generic"])
def test_declared_validation_cases_fire(name):
    adapter = registry.adapters()[name]
    cases = adapter.validation_cases()
    assert cases
    for config, code in cases:
        assert code in [p.code for p in adapter.validate(config)]


@pytest.mark.parametrize("name", [c[0] for c in CASES.values() if not c[1]] + ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_tiny_configs_validate_and_match_their_adapter(name):
    adapter, config = tiny(name)
    assert registry.adapter_for(config) is adapter
    assert adapter.validate(config) == []
    assert config.num_hidden_layers == 8 and 32 <= config.hidden_size <= 64 and config.vocab_size <= 128
