from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from finescope.config import (
    PIPELINE_SETS,
    ConfigError,
    CurateConfig,
    EvalConfig,
    PipelineConfig,
    PruneConfig,
    RecoverConfig,
    add_config_arguments,
    apply_overrides,
    config_from_args,
    field_docs,
    from_dict,
    load_config,
    preset_dir,
    to_yaml,
)

STAGES = (CurateConfig, PruneConfig, RecoverConfig, EvalConfig, PipelineConfig)


@pytest.mark.parametrize("cls", STAGES)
def test_every_field_has_a_docstring_and_defaults_validate(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert missing == []
    from finescope.config import to_dict

    assert from_dict(cls, to_dict(cls()), strict=True) == cls()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ncurate:\n  top_m: 50\n  layers: [3, 7]\nprune:\n  ratio: 0.3\n")
    cfg = load_config(
        PipelineConfig,
        path,
        [
            "curate.top_m=200",
            "prune.importance=magnitude",
            "eval.tasks=nll:math,gsm8k",
            "recover.lora_rank=4",
            "prune.attention_ratio=0.25",
            "recover.lr=1e-5",
        ],
    )
    assert cfg.name == "demo" and cfg.curate.layers == [3, 7] and cfg.prune.ratio == 0.3
    assert cfg.curate.top_m == 200 and cfg.prune.importance == "magnitude"
    assert cfg.eval.tasks == ["nll:math", "gsm8k"] and cfg.recover.lora_rank == 4
    assert cfg.prune.attention_ratio == 0.25 and cfg.recover.lr == 1e-5
    assert apply_overrides(cfg, ["prune.attention_ratio=none"]).prune.attention_ratio is None
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(PipelineConfig, again) == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("curate.top_m=0", r"curate\.top_m = 0: must be ≥ 1"),
        ("prune.ratio=1.2", r"prune\.ratio = 1\.2: must be in \(0, 1\)"),
        ("prune.ratio=0", r"prune\.ratio = 0\.0: must be in \(0, 1\)"),
        ("prune.ratio=abc", r"prune\.ratio = 'abc': must be a number"),
        ("curate.top_m=1.5", r"curate\.top_m = '1\.5': must be an integer"),
        ("curate.selector=best", r"curate\.selector = 'best': must be one of jacobian, gradient, magnitude"),
        ("recover.no_teacher=maybe", r"recover\.no_teacher = 'maybe': must be true or false"),
        ("curate.layers=1,x", r"curate\.layers\[1\] = 'x': must be an integer"),
        ("curate.top_n=5", r"unknown config key 'curate\.top_n' \(did you mean 'top_m'\?\) under 'curate'"),
        ("nmae=x", r"unknown config key 'nmae' \(did you mean 'name'\?\)"),
        ("curate.top_m.x=1", r"'curate\.top_m' has no sub-keys"),
        ("top_m", r"must look like key=value"),
        ("prune.attention_ratio=1", r"prune\.attention_ratio = 1\.0: must be in \[0, 1\)"),
    ],
)
def test_override_errors_name_field_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(PipelineConfig(), [override])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("curate:\n  top_m: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: curate\.top_m = 0: must be ≥ 1"):
        load_config(PipelineConfig, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("curate:\n  top_m: [1,\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ invalid YAML"):
        load_config(PipelineConfig, broken)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(PipelineConfig, notmap)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PipelineConfig, tmp_path / "nope.yaml")
    sub = tmp_path / "sub.yaml"
    sub.write_text("curate: 5\n")
    with pytest.raises(ConfigError, match=r"sub\.yaml: curate must be a mapping of CurateConfig fields"):
        load_config(PipelineConfig, sub)


def test_unknown_yaml_keys_warn_but_load(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("name: x\ncurate:\n  retired_option: 3\n")
    with pytest.warns(UserWarning, match=r"curate\.retired_option: unknown config key"):
        cfg = load_config(PipelineConfig, path)
    assert cfg.name == "x"


def test_cli_arguments_from_dataclass():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PruneConfig)
    help_text = parser.format_help()
    assert "--ratio" in help_text and "Target fraction of *total* parameters removed" in help_text
    assert "Choices: taylor, taylor2" in help_text and "--no-overwrite" in help_text
    args = parser.parse_args(["--ratio", "0.3", "--importance", "flap", "--overwrite", "--depth", "2"])
    cfg = config_from_args(PruneConfig, args)
    assert (cfg.ratio, cfg.importance, cfg.overwrite, cfg.depth) == (0.3, "flap", True, 2)
    assert cfg.calib_samples == PruneConfig().calib_samples
    with pytest.raises(ConfigError, match=r"ratio = 2\.0: must be in \(0, 1\)"):
        config_from_args(PruneConfig, parser.parse_args(["--ratio", "2"]))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, CurateConfig)
    cfg = config_from_args(CurateConfig, parser.parse_args(["--layers", "3,9"]), base=CurateConfig(top_m=7))
    assert cfg.layers == [3, 9] and cfg.top_m == 7


@pytest.mark.parametrize(
    "section,field,value,instead",
    [
        (s, f, "x" if f != "no_teacher" else "true", instead)
        for s, fields in PIPELINE_SETS.items()
        for f, instead in fields.items()
        if f != "method"
    ]
    + [("curate", "method", "embedding", "`variants`")],
)
def test_pipeline_refuses_fields_it_sets_itself(tmp_path, section, field, value, instead):
    """A wiring field in a pipeline config would be overwritten for every variant: refused, naming the key to use."""
    path = tmp_path / "p.yaml"
    path.write_text(f"{section}:\n  {field}: {value}\n")
    with pytest.raises(
        ConfigError, match=rf"p\.yaml: {section}\.{field}: set by the pipeline .*use {re.escape(instead)}"
    ):
        load_config(PipelineConfig, path)
    with pytest.raises(ConfigError, match=rf"command line: {section}\.{field}: set by the pipeline"):
        load_config(PipelineConfig, None, [f"{section}.{field}={value}"])


def test_variants_validated_against_the_variant_table(tmp_path):
    from finescope.variants import VARIANTS

    every = load_config(PipelineConfig, None, ["variants=" + ",".join(VARIANTS), "recover.kd_weight=0.5"])
    assert every.variants == list(VARIANTS)
    with pytest.raises(
        ConfigError, match=r"variants\[1\] = 'pruned_tdg': unknown variant \(did you mean 'pruned_tgd'\?\)"
    ):
        load_config(PipelineConfig, None, ["variants=dense,pruned_tdg"])
    path = tmp_path / "p.yaml"
    path.write_text("variants: [dense, nope_nothing_like_it]\n")
    with pytest.raises(
        ConfigError, match=r"p\.yaml: variants\[1\] = 'nope_nothing_like_it': unknown variant \(known: dense,"
    ):
        load_config(PipelineConfig, path)


def test_fields_added_at_their_old_behaviour_leave_the_hash_alone():
    """HASH_OMIT_AT: a field added later, at the value that reproduces the earlier behaviour, is not hashed, so
    finished stages of an earlier version stay valid; any other value is hashed."""
    from finescope.config import CurateConfig, RecoverConfig
    from finescope.storage import config_hash, to_jsonable

    for cfg in (CurateConfig(layer_depth=0.5), RecoverConfig(group_by_length=False)):  # added fields, old behaviour
        data = to_jsonable(cfg)
        for name in (*cfg.HASH_EXCLUDE, *cfg.HASH_OMIT_AT):
            data.pop(name)
        assert config_hash(cfg) == config_hash(data)  # exactly the hash of the config without those fields
    assert config_hash(CurateConfig(layer_depth=0.87)) != config_hash(CurateConfig(layer_depth=0.5))
    assert config_hash(CurateConfig(sae_data="pool+reference")) != config_hash(CurateConfig())
    assert config_hash(CurateConfig(dtype="bfloat16")) != config_hash(CurateConfig())
    assert config_hash(CurateConfig(device="cpu")) == config_hash(CurateConfig())  # device is never hashed
    assert config_hash(RecoverConfig()) != config_hash(RecoverConfig(group_by_length=False))


def test_finescope_variants_curate_with_the_configs_method_sae_or_hybrid(tmp_path):
    """`curate.method` in a pipeline config is the FineScope variants' own selection (sae or hybrid, issue 29: the
    default, law and code presets use hybrid); the other methods stay variants of their own."""
    from finescope import pipeline

    def curate_methods(spec, *overrides):
        cfg = load_config(PipelineConfig, pipeline.resolve_config(spec), [f"runs_dir={tmp_path}", *overrides])
        _, chains = pipeline.plan(cfg, tmp_path)
        return {name: chain["curate"].cfg.method for name, chain in chains.items() if "curate" in chain}

    assert set(curate_methods("default").values()) == {"hybrid"}
    assert set(curate_methods("default", "curate.method=sae").values()) == {"sae"}
    paper = curate_methods("paper-ablations")
    assert paper["pruned_tgd"] == "sae" and paper["embedding_tgd"] == "embedding" and paper["pruned_random"] == "random"
    with pytest.raises(ConfigError, match="curate.method: set by the pipeline"):
        load_config(PipelineConfig, pipeline.resolve_config("default"), ["curate.method=dsir"])


def test_extends_takes_a_preset_and_lays_the_files_keys_on_top(tmp_path):
    """`extends: default` starts from the packaged preset: sections merge key by key, lists and values replace."""
    path = tmp_path / "mine.yaml"
    path.write_text(
        "extends: default\nname: mine\ncurate:\n  pool_sample: 8000\neval:\n  tasks: [nll:math, nll:code]\n"
    )
    cfg = load_config(PipelineConfig, path)
    default = load_config(PipelineConfig, preset_dir() / "default.yaml")
    assert cfg.name == "mine" and cfg.curate.pool_sample == 8000 and cfg.eval.tasks == ["nll:math", "nll:code"]
    # every other key is the preset's, not the dataclass default's
    assert cfg.curate.method == default.curate.method == "hybrid"
    assert cfg.prune == default.prune and cfg.recover == default.recover and cfg.variants == default.variants
    assert cfg.curate.top_m == default.curate.top_m and cfg.eval.limit == default.eval.limit


def test_extends_a_file_relative_to_the_extending_one_chained(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("name: base\ncurate:\n  top_m: 7\n  pool_sample: 50\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\ncurate:\n  top_m: 9\n")
    (tmp_path / "sub" / "top.yaml").write_text("extends: mid.yaml\nname: top\n")
    cfg = load_config(PipelineConfig, tmp_path / "sub" / "top.yaml")
    assert (cfg.name, cfg.curate.top_m, cfg.curate.pool_sample) == ("top", 9, 50)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("extends: nonesuch\n", r"mine.yaml: extends = 'nonesuch': no such preset; presets: .*default"),
        (
            "extends: [default]\n",
            r"mine.yaml: extends = .*: must name a packaged preset \(.*default.*\) or a YAML file",
        ),
        ("extends: missing.yaml\n", r"missing.yaml: config file not found"),
        ("extends: mine.yaml\n", r"mine.yaml: extends: a loop \(.*mine.yaml → .*mine.yaml\)"),
        ("extends: list.yaml\n", r"list.yaml: not a mapping of config keys \(extended by .*mine.yaml\)"),
    ],
)
def test_a_bad_extends_is_one_line_naming_the_file(tmp_path, text, message):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(PipelineConfig, path)
    assert "\n" not in str(err.value)


def test_an_error_in_an_inherited_key_names_the_base_file_that_set_it(tmp_path):
    """A bad value an `extends:` base brought in is that base's error; one the extending file set (or replaced) is
    the extending file's; a bad base value the extending file replaces is no error at all."""
    (tmp_path / "base.yaml").write_text("curate:\n  top_m: 0\n  pool_sample: 50\neval:\n  tasks: [nll:math]\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\nprune:\n  ratio: 2\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\nname: top\n")
    with pytest.raises(ConfigError, match=r"^\S*base.yaml: curate.top_m = 0: must be ≥ 1$"):
        load_config(PipelineConfig, tmp_path / "top.yaml")
    (tmp_path / "base.yaml").write_text("curate:\n  top_m: 3\n")
    with pytest.raises(ConfigError, match=r"^\S*mid.yaml: prune.ratio = 2\b"):
        load_config(PipelineConfig, tmp_path / "top.yaml")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\nprune:\n  ratio: 3\n")
    with pytest.raises(ConfigError, match=r"^\S*top.yaml: prune.ratio = 3\b"):
        load_config(PipelineConfig, tmp_path / "top.yaml")
    # the extending file replaces the base's bad value: it loads
    (tmp_path / "base.yaml").write_text("curate:\n  top_m: 0\n  pool_sample: 50\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\ncurate:\n  top_m: 4\n")
    cfg = load_config(PipelineConfig, tmp_path / "top.yaml")
    assert (cfg.curate.top_m, cfg.curate.pool_sample) == (4, 50)
    # an unknown key warns naming the file it is in
    (tmp_path / "base.yaml").write_text("curate:\n  top_mm: 3\n")
    with pytest.warns(UserWarning, match=r"^\S*base.yaml: curate.top_mm: unknown config key \(did you mean 'top_m'"):
        load_config(PipelineConfig, tmp_path / "top.yaml")


def test_a_loop_through_two_files_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"b.yaml: extends: a loop \(.*a.yaml → .*b.yaml → .*a.yaml\)"):
        load_config(PipelineConfig, tmp_path / "a.yaml")
