"""Recipe config: typed values, overrides, every problem reported at once with the key named."""

import pytest

from pixart_tune.config import Config, ConfigError, load_config, save_config, valid_keys


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config(None, ["train.lr=5e-5", "train.steps=12", "lora.targets=[to_q, to_v]", "data.flip=true"])
    assert cfg.train.lr == pytest.approx(5e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 12
    assert cfg.lora.targets == ["to_q", "to_v"]
    assert cfg.data.flip is True


def test_yaml_scientific_notation_string_is_coerced(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; the config must still give a float.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1e-4\n")
    assert load_config(recipe).train.lr == pytest.approx(1e-4)


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.lerning_rate=1"])
    message = str(exc.value)
    assert "train.lerning_rate" in message
    assert "did you mean 'train.lr'" in message


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.steps=abc"])
    assert "'train.steps' expects an integer, got 'abc'" in str(exc.value)


def test_a_validation_size_must_be_whole_patches():
    """An explicit validation size is generated as is: 16-pixel steps (VAE factor 8 x patch size 2), said
    at load time rather than as a shape error after the training (the validation comes last)."""
    assert load_config(None, ["validation.height=48", "validation.width=1024"]).validation.height == 48
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["validation.height=40", "validation.width=8"])
    assert exc.value.problems == [
        "'validation.height': must be a multiple of 16, at least 16 (the VAE's factor 8 times the patch size 2); use 32 or 48 (got 40)",
        "'validation.width': must be a multiple of 16, at least 16 (the VAE's factor 8 times the patch size 2); use 16 (got 8)",
    ]


def test_output_dir_must_be_a_folder(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError) as exc:
        load_config(None, [f"output_dir={tmp_path / 'a-file'}"])
    assert exc.value.problems[0].startswith("'output_dir': is a file, not a folder")
    assert load_config(None, [f"output_dir={tmp_path / 'new' / 'run'}"]).output_dir.endswith("run")


def test_a_sections_own_check_names_the_section_not_its_values():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.fp8=true", "train.method=full"])
    assert exc.value.problems == ["'train': fp8 is for LoRA runs (it quantises the frozen base weights); set train.fp8=false"]


def test_all_problems_reported_at_once(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("modle:\n  base: x\ntrain:\n  steps: many\n  batch_size: 0\ndata:\n  on_error: ignore\n")
    with pytest.raises(ConfigError) as exc:
        load_config(recipe)
    problems = exc.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    for key in ("modle", "train.steps", "train.batch_size", "data.on_error"):
        assert key in text
    assert str(recipe) in str(exc.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=7", "train.lr=3e-4", "output_dir=somewhere"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert isinstance(again, Config)


def test_contract_keys_exist():
    keys = set(valid_keys())
    for key in ("output_dir", "seed", "model.base", "data.path", "train.steps", "train.batch_size",
                "train.lr", "lora.rank", "lora.alpha"):
        assert key in keys
