"""The ``ppzoo`` command: ``plan`` (text and JSON), ``list``, and the errors a user sees."""

import json

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from ppzoo import registry
from ppzoo.architectures.llama import TINY
from ppzoo.cli import main
from ppzoo.testing.reference import save_tiny_model


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A directory holding config.json and nothing else."""
    directory = tmp_path_factory.mktemp("config")
    LlamaConfig(**TINY).save_pretrained(directory)
    return directory


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_text(config_dir, capsys):
    code, out, err = run(capsys, "plan", config_dir, "--pp", "2", "--microbatches", "4")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "llama (llama adapter): 80.4K parameters, pp=2, 2 stages, schedule 1F1B, loop placement",
        "stage rank    params     bytes   cost    act/mb   p+g+adam  modules",
        "    0    0     40.2K   160.8KB  49.7%   284.4MB    643.1KB  model.embed_tokens, model.layers.0-3",
        "    1    1     40.2K   160.9KB  50.3%   286.3MB    643.6KB  model.layers.4-7, model.norm, lm_head",
        "act/mb: activations per microbatch of 1 x 2048 tokens; p+g+adam: parameters, gradients, "
        "2 fp32 AdamW states; bubble with 4 microbatches: 20.0%",
    ]


def test_plan_text_v_placement_with_one_layer_stages(config_dir, capsys):
    code, out, _ = run(capsys, "plan", config_dir, "--pp", "4", "--schedule", "DualPipeV")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "llama (llama adapter): 80.4K parameters, pp=4, 8 stages, schedule DualPipeV, v placement"
    rows = [line.split() for line in lines[2:-1]]  # the last line explains the estimates
    assert [(int(r[0]), int(r[1])) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 3), (5, 2), (6, 1), (7, 0)]
    assert lines[2].endswith("  model.embed_tokens, model.layers.0")
    assert lines[3].endswith("  model.layers.1")
    assert lines[9].endswith("  model.layers.7, model.norm, lm_head")


def test_plan_json(config_dir, capsys):
    code, out, err = run(capsys, "plan", config_dir, "--pp", "2", "--microbatches", "4", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    assert data["total_params"] == model.num_parameters()
    layers = [f"model.layers.{i}" for i in range(8)]
    assert [s["modules"] for s in data["stages"]] == [
        ["model.embed_tokens", *layers[:4]],
        [*layers[4:], "model.norm", "lm_head"],
    ]
    assert [s["index"] for s in data["stages"]] == [0, 1]
    assert [s["rank"] for s in data["stages"]] == [0, 1]
    for stage in data["stages"]:
        assert stage["params"] == sum(p.numel() for m in stage["modules"] for p in model.get_submodule(m).parameters())
        assert stage["bytes"] == 4 * stage["params"]


def test_plan_follows_the_microbatches(config_dir, capsys):
    """With as many microbatches as stages the last stage is on every microbatch's critical path."""
    counts = {}
    for m in ("2", "8"):
        code, out, _ = run(capsys, "plan", config_dir, "--pp", "2", "--microbatches", m, "--json")
        assert code == 0
        counts[m] = [len([x for x in s["modules"] if x.startswith("model.layers.")]) for s in json.loads(out)["stages"]]
    assert counts == {"2": [5, 3], "8": [4, 4]}


def test_plan_json_options(config_dir, capsys):
    code, out, _ = run(
        capsys,
        "plan",
        config_dir,
        "--pp",
        "2",
        "--schedule",
        "Interleaved1F1B",
        "--layers-per-stage",
        "2",
        "--dtype",
        "bfloat16",
        "--json",
    )
    assert code == 0
    data = json.loads(out)
    assert [s["rank"] for s in data["stages"]] == [0, 1, 0, 1]
    assert [len([m for m in s["modules"] if m.startswith("model.layers.")]) for s in data["stages"]] == [2, 2, 2, 2]
    assert all(s["bytes"] == 2 * s["params"] for s in data["stages"])
    code, out, _ = run(capsys, "plan", config_dir, "--pp", "2", "--schedule", "ZBVZeroBubble", "--json")
    assert [s["rank"] for s in json.loads(out)["stages"]] == [0, 1, 1, 0]


def test_plan_cli_prints_and_dumps_estimates(tmp_path, capsys):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    argv = [
        "plan",
        str(tmp_path),
        "--pp",
        "2",
        "--seq-len",
        "128",
        "--microbatch-size",
        "2",
        "--microbatches",
        "6",
        "--fused-attention",
    ]
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layer = 2 * 128 * (1920 + 4 * 4)
    assert data["estimates"]["stages"][0]["activation_bytes_per_microbatch"] == 4 * layer + 2 * 128 * 4 * 32
    assert (data["estimates"]["seq_len"], data["estimates"]["microbatch_size"]) == (128, 2)
    assert data["estimates"]["bubble_fraction"] == pytest.approx(1 / 7)
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("bubble with 6 microbatches: 14.3%")
    assert main(["plan", str(tmp_path), "--pp", "2", "--schedule", "DualPipeV", "--microbatches", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("not modelled for this schedule")
    assert main(["plan", str(tmp_path), "--pp", "2", "--seq-len", "0"]) == 2
    assert "--seq-len must be a positive integer, got 0" in capsys.readouterr().err


def test_plan_of_a_full_checkpoint_equals_its_config(config_dir, tmp_path, capsys):
    save_tiny_model(registry.adapters()["llama"], tmp_path)
    _, with_weights, _ = run(capsys, "plan", tmp_path, "--pp", "3", "--json")
    _, config_only, _ = run(capsys, "plan", config_dir, "--pp", "3", "--json")
    assert json.loads(with_weights) == json.loads(config_only)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pp", "0"], "pp must be an integer >= 1, got 0"),
        (["--pp", "9"], "9 stages (pp=9 × 1 per rank) is more than the model's 8 layers; lower pp or stages per rank"),
        (
            ["--pp", "2", "--layers-per-stage", "3"],
            "3 stages cannot be spread evenly over pp=2 ranks; choose a stage count divisible by 2",
        ),
        (
            ["--pp", "2", "--schedule", "ZBVZeroBubble", "--stages-per-rank", "3"],
            "schedule ZBVZeroBubble needs V placement with exactly two stages per rank, got 3",
        ),
        (
            ["--pp", "2", "--schedule", "nope"],
            "unknown schedule 'nope'; use one of GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, "
            "ZBVZeroBubble, DualPipeV, or a path to a .csv schedule",
        ),
        (
            ["--pp", "2", "--dtype", "float33"],
            "dtype 'float33' is not a torch dtype; use e.g. bfloat16, float16 or float32",
        ),
    ],
    ids=["pp0", "too-many-stages", "not-divisible", "v-needs-two", "schedule", "dtype"],
)
def test_plan_errors(config_dir, capsys, args, message):
    code, out, err = run(capsys, "plan", config_dir, *args)
    assert (code, out) == (2, "")
    assert err == f"ppzoo plan: error: {message}\n"


def test_plan_of_a_missing_directory(tmp_path, capsys):
    code, _, err = run(capsys, "plan", tmp_path / "nowhere", "--pp", "2")
    assert code == 2
    assert err == (
        f"ppzoo plan: error: no directory {str(tmp_path / 'nowhere')!r}; pass a Hugging Face model directory or hub id\n"
    )


def test_plan_of_a_directory_without_config(tmp_path, capsys):
    code, _, err = run(capsys, "plan", tmp_path, "--pp", "2")
    assert code == 2
    assert (
        err
        == f"ppzoo plan: error: {str(tmp_path)!r} has no config.json; pass a Hugging Face model directory or hub id\n"
    )


def test_plan_of_an_unreachable_hub_id(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run(capsys, "plan", "ppzoo-test/not-a-model", "--pp", "2")
    assert (code, out) == (2, "")
    assert err.startswith("ppzoo plan: error: ") and "Traceback" not in err


def test_plan_of_an_unknown_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code, _, err = run(capsys, "plan", tmp_path, "--pp", "2")
    assert code == 2
    assert err.startswith("ppzoo plan: error: no ppzoo adapter for model_type 'bert'; registered: ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "somewhere"], "the following arguments are required: --pp"),
        (["plan", "somewhere", "--pp", "two"], "argument --pp: invalid int value: 'two'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_list(capsys):
    code, out, err = run(capsys, "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    adapters = registry.adapters()
    assert [line.split()[0] for line in lines] == list(adapters)
    assert f"{'llama':<14} {'llama':<32} ppzoo (built-in ppzoo.architectures.llama)" in lines
    assert f"{'qwen3':<14} {'qwen3':<32} ppzoo (built-in ppzoo.architectures.qwen2)" in lines
    for line, adapter in zip(lines, adapters.values()):
        types_ = ", ".join(adapter.model_types) or "(fallback)"
        assert line.startswith(f"{adapter.name:<14} {types_:<32} "), line


def test_list_shows_a_plugin_adapter(capsys):
    from ppzoo import Adapter, hookimpl

    class Toy(Adapter):
        name = "toy"
        model_types = ("toy_lm",)

    class Plugin:
        @hookimpl
        def ppzoo_register_adapters(self, register):
            register(Toy())

    with registry.plugin(Plugin(), name="toy-plugin"):
        code, out, _ = run(capsys, "list")
    assert code == 0
    assert f"{'toy':<14} {'toy_lm':<32} toy-plugin (registered at run time)" in out.splitlines()


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "opt", "bloom"])
def test_plan_estimates_every_dense_layer_kind(model_type, tmp_path, capsys):
    """Non-gated MLPs sized by n_inner, ffn_dim or nothing, fused QKV, multi-query and multi-head
    attention: the plan and its estimates come from the layers' own shapes."""
    from ppzoo.estimate import layer_activation_bytes
    from ppzoo.meta import meta_model
    from ppzoo.testing.tiny_configs import tiny_config

    config = tiny_config(model_type)
    config.save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--pp", "2", "--layers-per-stage", "2", "--seq-len", "64", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    adapter = registry.adapter_for(config)
    layout = adapter.fqn_layout(config)
    model = meta_model(config)
    layers = []
    for i in range(layout.num_layers):
        shape = adapter.layer_shape(config, model.get_submodule(layout.layer(i)))
        layers.append(
            layer_activation_bytes(
                hidden=shape.hidden,
                q_hidden=shape.q_width,
                kv_hidden=shape.kv_width,
                intermediate=shape.mlp_width,
                gated=shape.gated,
                heads=shape.heads,
                seq_len=64,
                element_bytes=4,
            )
        )
    first = data["estimates"]["stages"][0]["activation_bytes_per_microbatch"]
    assert first == sum(layers[:2]) + 64 * 4 * config.hidden_size
    code, out, _ = run(capsys, "plan", tmp_path, "--pp", "2")
    assert code == 0 and out.splitlines()[0].startswith(f"{model_type} ({adapter.name} adapter)")


# -- the plan cache -------------------------------------------------------------------------------


@pytest.fixture
def plan_cache(tmp_path, monkeypatch):
    """A private cache directory, used as a fresh ``ppzoo`` process would use it."""
    import ppzoo.cli

    monkeypatch.setenv("PPZOO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ppzoo.cli, "_fresh_process", lambda: True)
    return tmp_path / "cache" / "plans"


@pytest.mark.parametrize("extra", [[], ["--json"], ["--schedule", "Interleaved1F1B", "--seq-len", "64"]])
def test_plan_from_the_cache_is_the_plan(config_dir, capsys, plan_cache, monkeypatch, extra):
    import ppzoo.cli

    argv = ["plan", config_dir, "--pp", "2", *extra]
    fresh = run(capsys, *argv, "--no-cache")
    assert not plan_cache.exists()
    first = run(capsys, *argv)
    assert first == fresh and len(list(plan_cache.iterdir())) == 1

    def refuse(args):
        raise AssertionError("planned again instead of answering from the cache")

    monkeypatch.setattr(ppzoo.cli, "_plan_answer", refuse)
    assert run(capsys, *argv) == fresh
    # NOTE: the other rendering of the same plan is cached with it
    other = [a for a in argv if a != "--json"] if "--json" in argv else [*argv, "--json"]
    monkeypatch.undo()
    monkeypatch.setenv("PPZOO_CACHE_DIR", str(plan_cache.parent))
    monkeypatch.setattr(ppzoo.cli, "_fresh_process", lambda: True)
    assert run(capsys, *other) == run(capsys, *other, "--no-cache")


def test_plan_refusal_from_the_cache_is_the_refusal(config_dir, capsys, plan_cache, monkeypatch):
    import ppzoo.cli

    argv = ["plan", config_dir, "--pp", "9", "--schedule", "Interleaved1F1B"]
    first = run(capsys, *argv)
    assert first[0] == 2 and "more than the model's 8 layers" in first[2]
    monkeypatch.setattr(ppzoo.cli, "_plan_answer", lambda args: pytest.fail("planned again"))
    assert run(capsys, *argv) == first


def test_plan_cache_keys_on_the_config_and_the_options(tmp_path, capsys, plan_cache):
    LlamaConfig(**TINY).save_pretrained(tmp_path / "model")
    run(capsys, "plan", tmp_path / "model", "--pp", "2")
    run(capsys, "plan", tmp_path / "model", "--pp", "2", "--microbatches", "8")
    assert len(list(plan_cache.iterdir())) == 2
    LlamaConfig(**{**TINY, "num_hidden_layers": 6}).save_pretrained(tmp_path / "model")
    code, out, _ = run(capsys, "plan", tmp_path / "model", "--pp", "2", "--json")
    assert code == 0 and len(list(plan_cache.iterdir())) == 3
    assert sum(len([m for m in s["modules"] if ".layers." in m]) for s in json.loads(out)["stages"]) == 6


def test_plan_cache_is_not_used_after_planning_in_process(config_dir, capsys, tmp_path, monkeypatch):
    """A process that already planned may have plugins or patches the key cannot see."""
    monkeypatch.setenv("PPZOO_CACHE_DIR", str(tmp_path))
    assert run(capsys, "plan", config_dir, "--pp", "2")[0] == 0
    assert not (tmp_path / "plans").exists()


def test_plan_with_measured_costs(config_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PPZOO_CACHE_DIR", str(tmp_path))
    code, out, err = run(capsys, "plan", config_dir, "--pp", "2", "--seq-len", "16", "--cost", "measured", "--json")
    assert (code, err) == (0, "")
    stages = json.loads(out)["stages"]
    assert [m for s in stages for m in s["modules"]][0] == "model.embed_tokens" and len(stages) == 2


@pytest.mark.distributed  # NOTE: starts Python processes, the only way to see what a command imports
def test_plan_from_the_cache_imports_neither_torch_nor_transformers(config_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PPZOO_CACHE_DIR=str(tmp_path))
    argv = ["plan", str(config_dir), "--pp", "2"]
    script = (
        "import sys; from ppzoo.cli import main; code = main(sys.argv[1:]); "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "print('imported:', heavy, file=sys.stderr); sys.exit(code)"
    )
    first = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True)
    again = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True)
    assert first.returncode == again.returncode == 0
    assert "imported: ['torch', 'transformers']" in first.stderr
    assert "imported: []" in again.stderr and again.stdout == first.stdout
