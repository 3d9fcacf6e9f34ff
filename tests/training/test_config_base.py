"""Configs that inherit: ``base:`` names a file (relative to the config) whose settings the config's own
override, section by section; cycles and missing bases are one-line errors; ``--print-config``
prints the merged config, which loads back to the same run config."""

from pathlib import Path

import pytest
import yaml
from train_harness import TINY

from lvx_megatron.training import main
from lvx_megatron.training.config import ConfigError, config_yaml, load_config

CONFIGS = TINY.parent


def _write(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_config_overrides_its_base_section_by_section(tmp_path):
    base = yaml.safe_load(TINY.read_text())
    _write(tmp_path / "presets/tiny.yaml", base)
    child = _write(
        tmp_path / "runs/child.yaml",
        {
            "base": "../presets/tiny.yaml",
            "model": {"text": {"cross_attention_layers": [3]}, "cross_attention": {"strategy": "kv_ring"}},
            "training": {"lr": 0.25},
        },
    )
    cfg, plain = load_config(child), load_config(TINY)
    assert cfg.model.text.cross_attention_layers == [3]  # a list replaces the base's, it does not extend it
    assert cfg.model.cross_attention.strategy == "kv_ring" and cfg.training.lr == 0.25
    assert plain.model.text.cross_attention_layers != [3] and plain.model.cross_attention.strategy != "kv_ring"
    # everything the child leaves alone is the base's, in the sections it touches too
    for section, fields in (("model", ("text", "cross_attention")), ("training", ("lr",))):
        child_dump, plain_dump = cfg.model_dump()[section], plain.model_dump()[section]
        for name in fields:
            del child_dump[name], plain_dump[name]
        assert child_dump == plain_dump
    assert cfg.model.text.num_layers == plain.model.text.num_layers
    grandchild = _write(tmp_path / "runs/grandchild.yaml", {"base": "child.yaml", "training": {"lr": 0.5}})
    assert load_config(grandchild).model.cross_attention.strategy == "kv_ring"
    assert load_config(grandchild).training.lr == 0.5


def test_a_cycle_or_a_missing_or_bad_base_is_one_line_naming_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    _write(a, {"base": "b.yaml"})
    _write(b, {"base": "a.yaml", "training": {"lr": 0.1}})
    with pytest.raises(ConfigError) as exc:
        load_config(a)
    assert str(exc.value) == f"config error: {b}: base: the bases form a cycle: {a} -> {b} -> {a}"
    _write(a, {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=r"the bases form a cycle: .*a\.yaml -> .*a\.yaml$"):
        load_config(a)
    _write(a, {"base": "missing.yaml"})
    with pytest.raises(ConfigError) as exc:
        load_config(a)
    assert str(exc.value) == f"config error: {a}: base: no such file {str(tmp_path / 'missing.yaml')!r}"
    _write(a, {"base": ["b.yaml"]})
    with pytest.raises(ConfigError, match=r"base: must be a file path relative to this file, got \['b.yaml'\]"):
        load_config(a)
    b.write_text("training: [1\n")
    _write(a, {"base": "b.yaml"})
    with pytest.raises(ConfigError, match=rf"config error: {b}:2:1: not valid YAML"):  # the base's own line
        load_config(a)


def test_print_config_prints_the_merged_config_with_the_flags_applied(tmp_path, capsys):
    config = CONFIGS / "llama-3.2-11b-vision-long-video.yaml"
    assert main(["--config", str(config), "--print-config", "--lr", "0.125"]) is None
    printed = capsys.readouterr().out
    reloaded = load_config(_write(tmp_path / "printed.yaml", yaml.safe_load(printed)))
    assert reloaded == load_config(config, {"training.lr": 0.125})
    assert printed == config_yaml(reloaded)
    assert reloaded.data.max_images == 64 and reloaded.model.text.num_layers == 40  # its own, and its base's


VARIANTS = [p for p in sorted(CONFIGS.glob("*.yaml")) if "base" in yaml.safe_load(p.read_text())]


def test_the_large_presets_are_variants():
    assert {p.name for p in VARIANTS} >= {
        "llama-3.2-11b-vision-long-video.yaml",
        "llama-3.2-11b-vision-long-video-multinode.yaml",
        "llama-3.2-90b-vision.yaml",
        "single-gpu-1b-fused.yaml",
    }


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.name)
def test_a_shipped_variant_holds_only_its_differences_from_its_base(path):
    tree = yaml.safe_load(path.read_text())
    base = load_config(path.parent / tree.pop("base")).model_dump(mode="json")

    def same(child: dict, parent: dict, where: str) -> list[str]:
        found = []
        for key, value in child.items():
            if isinstance(value, dict):
                found += same(value, parent[key], f"{where}{key}.")
            elif value == parent[key]:
                found.append(f"{where}{key}")
        return found

    assert same(tree, base, "") == []
