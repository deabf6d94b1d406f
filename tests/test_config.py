"""Configs: presets, overrides, and one clear error per bad input."""

from pathlib import Path

import pytest

from moe import ConfigError, ModelConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", ["tiny", "small", "base", "gpt4"])
def test_presets_load(preset):
    assert isinstance(load_config(preset).model, ModelConfig)


def test_small_preset_is_the_documented_cpu_default():
    cfg = load_config("small").model
    assert cfg == ModelConfig()  # the dataclass defaults are the small shape
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (8192, 256, 4, 8, 1)
    assert (cfg.n_experts, cfg.top_k, cfg.d_ff, cfg.max_seq_len) == (16, 2, 512, 256)


def test_dotted_overrides_are_parsed_and_typed():
    cfg = load_config("tiny", ["model.n_layers=3", "model.rope_theta=1e6", "model.tie_embeddings=true",
                               "model.dispatch=capacity", "model.capacity_factor=2"]).model
    assert cfg.n_layers == 3 and cfg.rope_theta == 1e6 and cfg.tie_embeddings is True
    assert cfg.dispatch == "capacity" and cfg.capacity_factor == 2.0 and isinstance(cfg.capacity_factor, float)


def test_defaults_without_a_file():
    assert load_config(None).model == ModelConfig()


@pytest.mark.parametrize("override, message", [
    (["model.n_layer=3"], "unknown key model.n_layer; did you mean model.n_layers?"),
    (["modle.n_layers=3"], "unknown key modle; did you mean model?"),
    (["model.n_layers=four"], "model.n_layers='four': expected int, got str"),
    (["model.n_layers=2.5"], "model.n_layers=2.5: expected int, got float"),
    (["model.tie_embeddings=1"], "model.tie_embeddings=1: expected bool, got int"),
    (["model.dispatch=sometimes"], "model.dispatch='sometimes': expected one of 'dropless', 'capacity'"),
    (["model.d_model=250"], "model.d_model=250 is not divisible by model.n_heads=4"),
    (["model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
    (["model.top_k=17"], "model.top_k=17 exceeds model.n_experts=16"),
    (["model.n_layers=0"], "model.n_layers=0: must be a positive integer"),
    (["model.norm_eps=-1e-5"], "model.norm_eps=-1e-05: must be > 0"),
    (["model.aux_loss_coef=-1"], "model.aux_loss_coef=-1.0: must be >= 0"),
    (["model.d_model=68"], "rotary embeddings need an even head dim"),
    (["n_layers=3"], "unknown key n_layers"),
    (["model.n_layers"], "expected section.key=value"),
])
def test_bad_values_raise_one_clear_error_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", override)
    text = str(info.value)
    assert message in text and "\n" not in text
    if not text.startswith("override"):  # errors in the merged config name the file too
        assert text.startswith(str(ROOT / "configs" / "tiny.toml"))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config 'nope' not found.*tiny"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layers = 2")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[model]\nd_modle = 64\n")
    with pytest.raises(ConfigError, match="typo.toml: unknown key model.d_modle; did you mean model.d_model"):
        load_config(typo)


def test_config_values_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config("tiny", [f"model.dispatch=__import__('pathlib').Path('{marker}').touch()"])
    assert not marker.exists()
