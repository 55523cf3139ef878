from pathlib import Path

import pytest

from rsitr.config import Config, ConfigError, available_presets, load_config, unique_run_name


def test_presets_load_and_round_trip() -> None:
    assert {"demo", "msa-lite0-minilm"} <= set(available_presets())
    for name in available_presets():
        config = load_config(name)
        assert Config.from_dict(config.to_dict()) == config


def test_dotted_overrides_are_typed() -> None:
    config = load_config("demo", ["train.epochs=3", "train.lr=0.5", "model.image_stages=2,3,4", "train.augment=false"])
    assert config.train.epochs == 3 and config.train.lr == 0.5
    assert config.model.image_stages == (2, 3, 4)
    assert config.train.augment is False
    taps = load_config("demo", ["model.image_taps=blocks.2, blocks.6"]).model.image_taps
    assert taps == ("blocks.2", "blocks.6")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochz=3"], "unknown keys"),
        (["train.epochs=three"], "cannot read"),
        (["epochs"], "key=value"),
        (["train.epochs=0"], r"train.epochs=0: expected a number ≥ 1"),
        (["train.rerank_k=-10"], r"train.rerank_k=-10: expected a number ≥ 0"),
        (["train.rerank_reverse_weight=-0.5"], r"train.rerank_reverse_weight=-0.5: expected a number ≥ 0"),
        (["train.rerank_reverse_weight=nan"], r"train.rerank_reverse_weight=nan: expected"),
    ],
)
def test_bad_overrides_fail_clearly(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_unknown_preset_names_the_presets() -> None:
    with pytest.raises(ConfigError, match="msa-lite0-minilm"):
        load_config("no-such-preset")


def test_a_config_file_without_a_name_is_not_taken_for_a_preset(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train: {epochs: 2}\nmodel: {image_taps: [blocks.3]}\n")
    config = load_config(str(path), ["model.image_stages=1,2"])
    assert config.name not in available_presets() and config.train.epochs == 2
    assert config.model.image_taps == ("blocks.3",) and config.model.image_stages == (1, 2)


def test_run_names_start_with_the_prefix_and_never_repeat() -> None:
    names = {unique_run_name("msa-four-towers") for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("msa-four-towers-20") for n in names)


def test_image_size_belongs_to_the_model_and_old_checkpoints_still_read() -> None:
    assert load_config("msa-four-towers").model.image_size == 260
    old = load_config("demo").to_dict()  # a checkpoint's config.json from before the move
    old["train"]["image_size"] = old["model"].pop("image_size") + 32
    assert Config.from_dict(old).model.image_size == load_config("demo").model.image_size + 32
    with pytest.raises(ConfigError, match="model.image_size"):
        load_config("demo", ["train.image_size=256"])  # the preset sets model.image_size: which one wins is unclear
