"""The native layout read from a forward cut to the first layers of each kind (``native.prefix``).

Each case discovers the layout twice, with the cut and with the whole model watched, and compares
the two layouts; it also checks that the cut was taken (or, for a model that carries values across
its layers, refused), and how many layers the cut model kept.
"""

import pytest

from ppzoo.architectures.native import layout, prefix
from ppzoo.testing.tiny_configs import tiny_config


def _longer(model_type, **settings):
    """``model_type``'s tiny config with ``settings`` (more layers than the prefix holds)."""
    config = tiny_config(model_type)
    values = config.to_dict()
    if "layer_types" not in settings:
        values.pop("layer_types", None)  # NOTE: derived again from the pattern for the new count
    values.update(settings)
    return type(config).from_dict(values)


def _both(config, monkeypatch):
    """``(cut, whole, what observe answered)``: the layout with the cut, and with the whole model watched."""
    answers = []
    observe = prefix.observe

    def spy(*args, **kwargs):
        answers.append(observe(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(prefix, "observe", spy)
    cut = layout._discover(config)
    monkeypatch.setattr(prefix, "observe", lambda *args, **kwargs: None)
    whole = layout._discover(config)
    return cut, whole, answers


#: name -> (config, layers the cut model keeps: one layer of each kind, in the order they come)
CASES = {
    # NOTE: dense layers, then MoE layers (first_k_dense_replace)
    "deepseek_v3": (lambda: _longer("deepseek_v3", num_hidden_layers=6, first_k_dense_replace=2), 3),
    # NOTE: hybrids, their kinds from a period (Jamba) and from layer_types (Qwen3-Next)
    "jamba": (lambda: _longer("jamba", num_hidden_layers=8), 2),
    "qwen3_next": (
        lambda: _longer(
            "qwen3_next", num_hidden_layers=8, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2
        ),
        4,
    ),
    # NOTE: blocks of two sublayers each, whose layer_idx counts 2·i and 2·i + 1
    "longcat_flash": (lambda: _longer("longcat_flash", num_layers=6), 2),
    "gemma3_text": (lambda: tiny_config("gemma3_text"), 2),
    "gpt2": (lambda: tiny_config("gpt2"), 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_cut_forward_finds_the_layout_the_whole_forward_does(name, monkeypatch):
    make, kept = CASES[name]
    config = make()
    cut, whole, answers = _both(config, monkeypatch)
    assert isinstance(whole, layout.NativeLayout)
    assert cut == whole
    (answer,) = answers
    assert answer is not None, "the cut was not taken"
    seen, cut_config, cut_model = answer
    assert len(cut_model.get_submodule(whole.layout.layers)) == kept < whole.layout.num_layers
    assert seen.order.count("layer 0") == 1 and len([o for o in seen.order if o.startswith("layer ")]) == (
        whole.layout.num_layers
    )


@pytest.mark.parametrize("model_type", ["gemma3n_text", "zamba"])
def test_a_model_that_carries_values_across_its_layers_is_watched_whole(model_type, monkeypatch):
    # NOTE: per-layer inputs and shared keys and values (Gemma 3n), a block shared by layers (Zamba)
    cut, whole, answers = _both(tiny_config(model_type), monkeypatch)
    assert answers == [None]
    assert cut == whole and whole.boundary.carries


def test_a_later_layer_built_otherwise_than_the_prefix_is_its_own_kind():
    config = tiny_config("gemma3_text")
    config.layer_types = ["sliding_attention"] * (config.num_hidden_layers - 1) + ["full_attention"]
    from ppzoo.meta import meta_model

    layers = meta_model(config).model.layers
    raw = [prefix._attributes(layer) for layer in layers]
    counting = prefix._counting(raw)
    signatures = [prefix._signature(layer, i, counting) for i, layer in enumerate(layers)]
    # NOTE: the same parameters, another attention type: the last layer differs, the others do not
    assert len(set(signatures[:-1])) == 1 and signatures[-1] != signatures[0]
    indices = [step for key, step in counting.items() if key.endswith(":layer_idx")]
    assert indices and all(step == (1, 0) for step in indices)


def test_the_cut_config_keeps_the_first_entries_of_per_layer_lists():
    config = _longer("qwen3_next", num_hidden_layers=8, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2)
    cut = prefix._cut(config, 8, 4)
    assert cut.num_hidden_layers == 4
    assert cut.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert config.num_hidden_layers == 8  # NOTE: a copy
    longcat = _longer("longcat_flash", num_layers=6)
    cut = prefix._cut(longcat, 6, 2)
    assert (cut.num_layers, cut.num_hidden_layers) == (2, 4)  # NOTE: sublayers counted twice
