"""Dropout streams keyed by (seed, piece, count) (``ppzoo.dropout``); the kit's ``dropout`` check runs
them against the unsplit model for every adapter (``tests/test_conformance.py``)."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ppzoo
from ppzoo.architectures.llama import LlamaAdapter
from ppzoo.checkpoint import Checkpoint
from ppzoo.config import load_config
from ppzoo.dropout import ROOT, draws_at_random, key_dropout, stream_seed
from ppzoo.layout import Layout
from ppzoo.stage import build_stage
from ppzoo.testing.dropout import check_dropout, with_dropout
from ppzoo.testing.reference import save_tiny_model

LAYOUT = Layout(inputs=(), layers="layers", num_layers=3, outputs=())


class Net(nn.Module):
    """Dropout before the layers (the root's stream) and inside each layer (its own stream)."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)) for _ in range(3))
        self.fail_at = fail_at

    def forward(self, x, *, recompute=False):
        x = nn.functional.dropout(x, 0.5, self.training)
        for i, layer in enumerate(self.layers):
            if i == self.fail_at:
                raise RuntimeError("boom")
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x


def _net(**kwargs):
    net = Net(**kwargs)
    key_dropout(net, LAYOUT, range(3), seed=7)
    return net


def test_masks_follow_the_key_not_the_global_stream():
    x = torch.ones(4, 8)
    a, b = _net(), _net()
    torch.manual_seed(1)
    first = a(x)
    torch.manual_seed(2)  # another global state: the same masks
    assert torch.equal(b(x), first)
    assert not torch.equal(a(x), first)  # the second forward (microbatch) draws other masks
    assert a.ppzoo_dropout.streams[ROOT].count == 2 and a.ppzoo_dropout.streams[0].count == 2


def test_the_global_random_state_is_left_as_it_was():
    net = _net()
    state = torch.get_rng_state()
    net(torch.ones(2, 8))
    assert torch.equal(torch.get_rng_state(), state)
    broken = _net(fail_at=1)
    with pytest.raises(RuntimeError, match="boom"):
        broken(torch.ones(2, 8))
    assert torch.equal(torch.get_rng_state(), state)


def test_eval_mode_draws_nothing_and_counts_nothing():
    net = _net().eval()
    x = torch.randn(2, 8)
    out = net(x)
    plain = Net().eval()
    assert torch.equal(out, plain(x))
    assert all(s.count == 0 for s in net.ppzoo_dropout.streams.values())


def test_a_layer_recomputed_in_the_backward_draws_its_forward_masks():
    x = torch.randn(4, 8)
    plain, recomputed = _net(), _net()
    for _microbatch in range(2):
        plain(x).sum().backward()
        recomputed(x, recompute=True).sum().backward()
    for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_without_a_seed_the_base_is_torch_initial_seed():
    a, b = Net(), Net()
    key_dropout(a, LAYOUT, range(3))
    key_dropout(b, LAYOUT, range(3), seed=11)
    torch.manual_seed(11)
    x = torch.ones(2, 8)
    assert torch.equal(a(x), b(x))
    assert stream_seed(11, 0, 0) != stream_seed(11, 1, 0) != stream_seed(11, 0, 1)


class DropsTwice(LlamaAdapter):
    """Applies an embedding dropout Llama does not have: the dropout check must see it."""

    name = "drops-twice"

    def embed(self, inner, input_ids, *, position_ids=None, attention_mask=None):
        return nn.functional.dropout(super().embed(inner, input_ids), 0.1, inner.training)


def test_the_dropout_check_catches_a_dropout_hugging_face_does_not_apply():
    with pytest.raises(AssertionError) as raised:
        check_dropout(DropsTwice())
    lines = str(raised.value).splitlines()
    assert lines[0] == "adapter 'drops-twice': dropout (train mode vs train mode)"
    assert lines[1].startswith("  - 2 stages, train mode with dropout: logits differ by ")
    assert not any("eval mode" in line for line in lines)


def test_with_dropout_turns_probabilities_on_and_leaves_layer_drop():
    from transformers import OPTConfig

    config, fields = with_dropout(OPTConfig(layerdrop=0.0, dropout=0.0, attention_dropout=0.0))
    assert {"attention_dropout", "dropout"} <= set(fields) and "layerdrop" not in fields
    assert (config.dropout, config.attention_dropout, config.layerdrop) == (0.25, 0.25, 0.0)


def test_what_draws_at_random():
    from transformers import LlamaConfig, MixtralConfig

    assert not draws_at_random(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)), LlamaConfig())
    assert draws_at_random(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    jitter = nn.Linear(2, 2)
    jitter.jitter_noise = 0.01  # a module field (Mixtral's MoE block keeps it so)
    assert draws_at_random(jitter)
    assert draws_at_random(nn.Linear(2, 2), LlamaConfig(attention_dropout=0.1))
    assert draws_at_random(nn.Linear(2, 2), MixtralConfig(router_jitter_noise=0.1))
    assert not draws_at_random(nn.Linear(2, 2), MixtralConfig())
    # NOTE: a config's tables may be keyed by numbers (Aria's patch count -> queries)
    assert not draws_at_random(nn.Linear(2, 2), LlamaConfig(projector_patch_to_query_dict={1225: 128}))
    assert draws_at_random(nn.Linear(2, 2), LlamaConfig(vision_config={"drop_path_rate": 0.1}))


def _stages(tmp_path, config=None):
    adapter = LlamaAdapter()
    directory = save_tiny_model(adapter, tmp_path, config=config)
    config, plan = load_config(directory), ppzoo.plan(directory, pp=2)
    return [build_stage(config, adapter, plan, i, checkpoint=Checkpoint(directory)) for i in range(2)]


def _hooked(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_a_stage_without_dropout_gets_no_streams_and_computes_what_one_with_streams_does(tmp_path):
    stages = _stages(tmp_path)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    for stage in stages:
        stage.train()
        assert not hasattr(stage, "ppzoo_dropout") and _hooked(stage) == []
    state = torch.get_rng_state()
    plain = stages[1](stages[0](ids))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    for stage in stages:
        key_dropout(stage, LlamaAdapter().fqn_layout(stage.config), stage.ppzoo_stage.layers, seed=3)
    assert torch.equal(stages[1](stages[0](ids)), plain)


def test_a_stage_with_dropout_gets_its_streams(tmp_path):
    config = LlamaAdapter().tiny_config()
    config.attention_dropout = 0.1
    for stage in _stages(tmp_path, config):
        assert stage.ppzoo_dropout.streams.keys() == {ROOT, *stage.ppzoo_stage.layers}
        assert _hooked(stage)
