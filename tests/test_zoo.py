"""The zoo: the native adapter (Hugging Face's own forward, steered per stage) and the census of
model types (``ppzoo.testing.zoo``, ``ppzoo zoo``).

The full census runs every decoder model type of the installed transformers (``ppzoo zoo``, see
docs/zoo.md); here a fixed sample checks that what must be exact is, and what must be refused is,
with the reason.
"""

import json

import pytest
from transformers import AutoConfig

import ppzoo
from ppzoo import registry
from ppzoo.checkpoint import Checkpoint
from ppzoo.cli import main
from ppzoo.registry import ValidationError
from ppzoo.stage import build_stage
from ppzoo.testing import census, zoo
from ppzoo.testing.reference import save_tiny_model
from ppzoo.testing.tiny_configs import (
    FIXES,
    VARIANTS,
    decoder_model_types,
    encoder_decoder_model_types,
    tiny_config,
)

#: model type -> the adapter that must run it exactly
EXACT = {
    "gpt2": "native",  # learned positions, Conv1D, tied head
    "opt": "native",  # positions offset by 2, computed from the attention mask
    "gpt_neox": "native",  # parallel residual, partial rotary, head saved as embed_out
    "bloom": "native",  # ALiBi, embedding layer norm, blocks that return tuples
    "falcon": "native",
    "phi": "native",
    "vaultgemma": "native",  # refused by the generic adapter (soft-capped logits), claimed by the native one
    "starcoder2": "generic",
    "llama": "llama",
}
#: model type -> the code of the problem it must be refused with
REFUSED = {
    "dory": "native-layer-order",  # runs its layers twice
    "trocr": "native-loss",  # its loss does not shift the labels
}


def test_the_sample_is_exact_or_refused_as_expected():
    results = {r.model_type: r for r in zoo([*EXACT, *REFUSED], isolate=False)}
    assert {t: (r.adapter, r.result) for t, r in results.items() if t in EXACT} == {
        t: (a, "exact") for t, a in EXACT.items()
    }
    for model_type, code in REFUSED.items():
        assert results[model_type].result == "refused", results[model_type]
        assert results[model_type].detail.startswith(f"{code}: "), results[model_type].detail


def test_the_census_covers_every_decoder_type():
    types_ = decoder_model_types()
    assert len(types_) == len(set(types_)) > 100
    assert not set(types_) & set(encoder_decoder_model_types())
    assert {"gpt2", "llama", "bloom"} <= set(types_) and "bart" not in types_
    assert set(FIXES) <= set(types_) | set(encoder_decoder_model_types())
    for settings, reason in FIXES.values():
        assert settings and reason


def test_unknown_model_types_are_named():
    with pytest.raises(ValueError, match=r"model types \['nonesuch'\] are not decoder causal-LM types"):
        zoo(["nonesuch"], isolate=False)


# -- variants ------------------------------------------------------------------------------------
def test_variants_are_their_model_types_config_with_the_checkpoints_settings():
    for name, (model_type, settings, reason) in VARIANTS.items():
        assert name.startswith(f"{model_type}[") and name.endswith("]") and settings and reason
        config = tiny_config(name)
        assert config.model_type == model_type
        assert {k: getattr(config, k) for k in settings} == settings
    assert not tiny_config("falcon").alibi and tiny_config("falcon[alibi]").alibi
    assert not tiny_config("falcon").new_decoder_architecture
    assert set(VARIANTS).isdisjoint(decoder_model_types())


def test_falcon_variants_are_exact_and_counted_apart_from_model_types():
    """Falcon-40B's new decoder architecture (grouped key/value heads, two layer norms) and
    Falcon-RW's ALiBi run through other code than the default (Falcon-7B-like) config."""
    types_ = ["falcon", "falcon[new_decoder]", "falcon[alibi]"]
    results = zoo(types_, isolate=False)
    assert [(r.model_type, r.adapter, r.result) for r in results] == [(t, "native", "exact") for t in types_]
    assert census.totals(results) == {"exact": 1, "refused": 0, "wrong": 0, "error": 0}
    assert census.variant_totals(results) == {"exact": 2, "refused": 0, "wrong": 0, "error": 0}
    assert census.summary(results).startswith("1 model types: 1 exact, 0 refused, 0 wrong, 0 error")
    assert "; 2 variants: 2 exact, 0 refused, 0 wrong, 0 error" in census.summary(results)


# -- the native adapter ------------------------------------------------------------------------
def test_a_native_stage_holds_only_its_own_parameters(tmp_path):
    adapter = census.zoo_adapter("gpt2")
    config = adapter.tiny_config()
    save_tiny_model(adapter, tmp_path, config=config)
    plan = ppzoo.plan(tmp_path, pp=3)
    stages = [
        build_stage(config, registry.adapter_for(config), plan, i, checkpoint=Checkpoint(tmp_path)) for i in range(3)
    ]
    for spec, stage in zip(plan.stages, stages):
        names = {n for n, _ in stage.named_parameters(remove_duplicate=False)}
        assert names == {n for n in names if any(n.startswith(m + ".") for m in spec.modules)}
        assert len(stage.transformer.h) == config.n_layer  # the full list: stand-ins for the others
        assert sorted(stage.transformer.h.keys(), key=int) == [str(i) for i in spec.layers]
    all_names = [n for s in stages for n, _ in s.named_parameters(remove_duplicate=False)]
    assert len(all_names) == len(set(all_names))


def test_refusals_come_before_any_weight_is_read():
    config = tiny_config("dory")  # no checkpoint anywhere: the plan alone refuses
    with pytest.raises(ValidationError) as raised:
        ppzoo.plan(config, pp=2)
    assert "native-layer-order" in raised.value.codes


def test_the_native_adapter_takes_what_the_generic_one_refuses(monkeypatch):
    config = AutoConfig.for_model("vaultgemma", num_hidden_layers=4)  # soft-capped logits
    assert registry.adapter_for(config).name == "native"
    assert registry.adapter_for(AutoConfig.for_model("helium")).name == "generic"
    assert registry.adapter_for(AutoConfig.for_model("llama")).name == "llama"
    monkeypatch.setenv("PPZOO_BLOCK_PLUGINS", "native")
    registry.reset()
    assert registry.adapter_for(config).name == "generic"
    with pytest.raises(ValidationError, match="final_logit_softcapping"):
        registry.validate(config)


def test_encoders_are_not_taken_unless_they_decode():
    with pytest.raises(registry.UnknownArchitectureError):
        registry.adapter_for(AutoConfig.for_model("bert"))
    assert registry.adapter_for(AutoConfig.for_model("bert", is_decoder=True)).name == "native"
    assert registry.adapter_for(AutoConfig.for_model("gpt_neox")).name == "native"  # is_decoder=False, never read


# -- the command line ----------------------------------------------------------------------------
def test_zoo_command_prints_json_and_exits_zero(capsys):
    code = main(["zoo", "--types", "gpt2,dory", "--in-process", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out)
    assert [(r["model_type"], r["result"]) for r in report["results"]] == [("gpt2", "exact"), ("dory", "refused")]
    assert report["totals"] == {"exact": 1, "refused": 1, "wrong": 0, "error": 0}
    assert "[1/2] gpt2: exact (native)" in err and "[2/2] dory: refused (native)" in err


def test_zoo_command_exits_one_on_a_wrong_or_crashed_type(capsys, monkeypatch):
    broken = census.ZooResult("gpt2", "native", "error", "RuntimeError: boom")
    monkeypatch.setattr(census, "check_model_type", lambda model_type: broken)
    assert main(["zoo", "--types", "gpt2", "--in-process", "--markdown"]) == 1
    out = capsys.readouterr().out
    assert "| gpt2 | native | error | RuntimeError: boom |" in out
    assert out.rstrip().endswith("1 model types: 0 exact, 0 refused, 0 wrong, 1 error")


def test_zoo_command_lists_the_types(capsys):
    assert main(["zoo", "--list"]) == 0
    assert capsys.readouterr().out.split() == [*decoder_model_types(), *VARIANTS]


def _step_verdicts(monkeypatch, problems_by_type):
    """Census results and step problems stubbed: ``distributed_step_problems`` returns
    ``problems_by_type[model_type]`` for each adapter view it is given."""
    from ppzoo.testing import step

    ran = []

    def check_model_type(model_type):
        return census.ZooResult(model_type, "native", "exact" if model_type in problems_by_type else "refused", "")

    def problems(adapters, *, schedules, timeout_s, progress=None):
        ran.append(([a.name for a in adapters], schedules))
        found = {a.name: problems_by_type[a.name.split("[", 1)[1][:-1]] for a in adapters}
        for name, p in found.items():
            progress(name, p)
        return found

    monkeypatch.setattr(census, "check_model_type", check_model_type)
    monkeypatch.setattr(step, "distributed_step_problems", problems)
    return ran


def test_zoo_step_reports_a_wrong_step_as_wrong_and_exits_one(capsys, monkeypatch):
    ran = _step_verdicts(
        monkeypatch,
        {"gpt2": [], "opt": ["1F1B rank 1: loss 4.60000000 != reference 4.50000000"]},
    )
    assert main(["zoo", "--types", "gpt2,opt,dory", "--in-process", "--step", "--markdown"]) == 1
    out, err = capsys.readouterr()
    # only the exact types step, in one group, under 1F1B and ZBVZeroBubble
    assert ran == [(["native[gpt2]", "native[opt]"], ("1F1B", "ZBVZeroBubble"))]
    assert "| model type | adapter | result | step | detail |" in out
    assert "| gpt2 | native | exact | exact |  |" in out
    assert (
        "| opt | native | wrong | wrong | the 2-rank step differs: 1F1B rank 1: loss 4.60000000 != reference "
        "4.50000000 |" in out
    )
    assert "| dory | native | refused | - |  |" in out
    assert out.rstrip().endswith(
        "3 model types: 1 exact, 1 refused, 1 wrong, 0 error (exact by adapter: native 1); "
        "2-rank step (1F1B, ZBVZeroBubble): 1 exact, 1 wrong, 0 error, 1 not run"
    )
    assert "[step 1/2] gpt2: exact" in err and "[step 2/2] opt: wrong" in err


def test_a_schedule_the_pipeline_refuses_is_named_not_counted_as_a_failed_step(capsys, monkeypatch):
    from ppzoo.testing.step import REFUSED

    refusal = f"{REFUSED} under ZBVZeroBubble: decoder layer 0 uses a weight twice; use 1F1B"
    _step_verdicts(monkeypatch, {"gpt2": [refusal], "opt": [refusal.replace("ZBVZeroBubble", "1F1B"), refusal]})
    assert main(["zoo", "--types", "gpt2,opt", "--in-process", "--step", "--markdown"]) == 1
    out = capsys.readouterr().out
    assert f"| gpt2 | native | exact | exact | {refusal} |" in out
    # refused under every schedule: no step ran, so the type is not exact
    assert "| opt | native | wrong | wrong | the 2-rank step differs: refused under 1F1B" in out


def test_zoo_step_reports_a_crashed_step_as_an_error_in_json(capsys, monkeypatch):
    from ppzoo.testing.step import CRASHED

    traceback = "--- rank 0 ---\nTraceback (most recent call last):\n  ...\nRuntimeError: boom\n"
    _step_verdicts(monkeypatch, {"gpt2": [f"{CRASHED}:\n{traceback}"]})
    assert main(["zoo", "--types", "gpt2", "--in-process", "--step", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    (row,) = report["results"]
    assert (row["result"], row["step"], row["step_detail"]) == ("error", "error", "rank 0: RuntimeError: boom")
    assert report["totals"] == {"exact": 0, "refused": 0, "wrong": 0, "error": 1}
    assert report["step_totals"] == {"exact": 0, "wrong": 0, "error": 1, "not run": 0}


def test_a_crash_is_reported_by_each_rank_s_root_cause():
    chained = (
        '--- rank 0 ---\nTraceback (most recent call last):\n  File "modeling.py", line 255\n'
        "IndexError: tuple index out of range\n\nThe above exception was the direct cause of the following "
        'exception:\n\nTraceback (most recent call last):\n  File "stage.py", line 900\n'
        "RuntimeError: \n    [Stage 0] failed to run forward:\n    kwargs: {}\n"
        '--- rank 1 ---\nTraceback (most recent call last):\n  File "schedules.py", line 683\n'
        "RuntimeError: Connection closed by peer\n"
        "--- rank 2 ---\nrank 2 exited with code -9 without a result\n"
    )
    assert census.crash_summary(chained) == (
        "rank 0: IndexError: tuple index out of range; rank 1: RuntimeError: Connection closed by peer; "
        "rank 2: rank 2 exited with code -9 without a result"
    )


# -- processes -----------------------------------------------------------------------------------
@pytest.mark.distributed
def test_a_type_that_runs_too_long_costs_only_itself():
    results = zoo(["gpt2", "dory"], jobs=1, timeout_s=0.5)
    assert [(r.model_type, r.result) for r in results] == [("gpt2", "error"), ("dory", "error")]
    assert results[0].detail == "timed out after 0.5s"
    results = zoo(["gpt2", "dory"], jobs=2)
    assert [(r.model_type, r.result) for r in results] == [("gpt2", "exact"), ("dory", "refused")]


@pytest.mark.distributed
def test_newly_covered_types_train_through_the_pipeline():
    from ppzoo.testing.step import distributed_step_problems

    adapters = [census.zoo_adapter(t) for t in ("opt", "bloom")]
    problems = distributed_step_problems(adapters)  # every placement kind: GPipe ... DualPipeV
    assert problems == {a.name: [] for a in adapters}


#: families whose 2-rank step is checked in one group: native-adapter dense families (and
#: StarCoder2, generic), Falcon's variants, and mixtures of experts with their router aux loss
STEPPED = (
    "gpt2",
    "opt",
    "bloom",
    "falcon",
    "falcon[new_decoder]",
    "falcon[alibi]",
    "gpt_neox",
    "phi",
    "starcoder2",
    "olmoe",  # router aux loss
    "granitemoe",  # router aux loss, multipliers
    "gpt_oss",  # attention sinks, alternating sliding window, biased experts, router aux loss
    "deepseek_v3",  # MLA, first_k_dense_replace dense layers, shared experts, group-limited routing
)


@pytest.mark.distributed
def test_families_step_under_1f1b_and_zbv():
    """One spawned 2-rank group: ``step`` under 1F1B (one stage a rank) and ZBVZeroBubble (V
    placement, tied head on rank 0) gives the unsplit model's loss (with each stage's router aux
    term, as the forward writes it) and gradients, in train mode with the class defaults' dropout
    (GPT-2, OPT: 0.1) drawn microbatch by microbatch alike, and its eval logits."""
    from ppzoo.testing.step import distributed_step_problems

    adapters = [census.zoo_adapter(t) for t in STEPPED]
    assert tiny_config("gpt2").resid_pdrop > 0  # the zoo keeps the class defaults' dropout
    assert tiny_config("olmoe").output_router_logits and tiny_config("gpt_oss").output_router_logits
    problems = distributed_step_problems(adapters, schedules=("1F1B", "ZBVZeroBubble"))
    assert problems == {a.name: [] for a in adapters}


@pytest.mark.distributed
def test_zoo_step_runs_the_two_rank_step_of_exact_types(capsys):
    assert main(["zoo", "--types", "gpt2,dory", "--in-process", "--step", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["model_type"], r["result"], r["step"]) for r in report["results"]] == [
        ("gpt2", "exact", "exact"),
        ("dory", "refused", None),
    ]
    assert report["step_totals"] == {"exact": 1, "wrong": 0, "error": 0, "not run": 1}


def test_a_z_loss_added_to_the_loss_is_refused_while_on():
    """Bamba adds a z-loss on the logits when its coefficient is above 0: ppzoo's loss would differ."""
    config = tiny_config("bamba")
    adapter = registry.adapter_for(config)
    assert not [p for p in adapter.validate(config) if p.code == "native-loss"]
    config.z_loss_coefficient = 0.1
    problems = [p for p in adapter.validate(config) if p.code == "native-loss"]
    assert len(problems) == 1 and "z_loss_coefficient=0.1" in problems[0].message, problems


def test_a_config_that_changes_when_saved_and_loaded_is_refused():
    """dots3_note_text's per-layer-type rotary settings change when transformers saves and loads the
    config: stages loading a checkpoint saved from it would run another model."""
    native = registry.adapters()["native"]
    problems = native.validate(tiny_config("dots3_note_text"))
    assert [p.code for p in problems] == ["native-round-trip"], problems
    assert "rope_parameters" in problems[0].message
    assert not [p for p in native.validate(tiny_config("gpt2")) if p.code == "native-round-trip"]
