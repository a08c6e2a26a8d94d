from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import ConfigError, load_config
from flows.defaults import CACHE_ENV
from tasks.data import SOURCES as DATA_SOURCES

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads():
    cfg = load_config(REPO / "configs" / "digits-resnet18.yaml")
    assert cfg.name == "digits-resnet18"
    assert cfg.backbone.layers == ["penultimate", "layer3"]
    assert cfg.extract.dtype == "float16"
    assert cfg.evaluate.retrieval.k == [1, 5, 10]


def test_unknown_keys_name_the_path_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, "name: x\ncolour: red\ndata: {source: digits, sead: 1}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "colour: unknown key; allowed here: name, data, backbone" in msg
    assert "data.sead: unknown key (did you mean 'seed'?); allowed here: source, root, val_fraction" in msg


@pytest.mark.parametrize("raw, line", [
    # a head's typo listed the top-level keys, with no suggestion
    ({"heads": [{"kind": "logistic", "shot": [1]}]},
     "heads.0.logistic.shot: unknown key (did you mean 'shots'?); allowed here: name, layer, preprocess, shots"),
    ({"heads": [{"kind": "knn", "kk": [1]}]}, "heads.0.knn.kk: unknown key (did you mean 'k'?); allowed here: name"),
    ({"finetune": {"epoch": 3}}, "finetune.epoch: unknown key (did you mean 'epochs'?); allowed here: enabled"),
    ({"finetune": {"early_stopping": {"patiense": 3}}},
     "finetune.early_stopping.patiense: unknown key (did you mean 'patience'?); allowed here: "),
    ({"backbone": {"preprocess": {"crop_size": 3}}}, "backbone.preprocess.crop_size: unknown key (did you mean 'crop'?)"),
    ({"extrct": {}}, "extrct: unknown key (did you mean 'extract'?); allowed here: name, data, backbone, extract"),
])
def test_a_typo_lists_the_keys_of_its_own_section_and_the_close_match(raw, line):
    from flows.config import parse_config

    with pytest.raises(ConfigError) as exc:
        parse_config({"name": "x", **raw})
    assert line in str(exc.value)


def _listed(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


_SOURCE_NAMES = _listed(list(DATA_SOURCES))  # the registry's names in its order, not a list written here


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data: {source: parquet}", f"data.source: Input should be {_SOURCE_NAMES} (got 'parquet')"),
        ("data: {on_bad_image: ignore}", "data.on_bad_image: Input should be 'error' or 'skip' (got 'ignore')"),
        ("data: {val_fraction: 0.6, test_fraction: 0.5}", "val_fraction + test_fraction must be < 1"),
        ("data: {source: imagefolder}", "source 'imagefolder' needs data.root"),
        ("extract: {dtype: float64}", "extract.dtype: Input should be 'float16' or 'float32' (got 'float64')"),
        ("extract: {device: tpu}", "extract.device: device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        ("extract: {batch_size: 0}", "extract.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("backbone: {name: resnet19}", "backbone.name: unknown torchvision model 'resnet19'. Did you mean resnet18"),
        ("backbone: {weights: IMAGENET1K_V9}", "unknown weights 'IMAGENET1K_V9' for resnet18. Did you mean IMAGENET1K_V1"),
        ("backbone: {layers: [layer9]}", "unknown layer(s) ['layer9'] for resnet18"),
        ("backbone: {layers: [layer9]}", "Top-level modules: conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc"),
        ("backbone: {preprocess: {std: [1, 0, 1]}}", "std values must be > 0"),
        ("retries: -1", "retries: Input should be greater than or equal to 0 (got -1)"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(tmp_path, text, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "name: x\n" + text + "\n"))
    assert expected in str(exc.value)


def test_missing_name_and_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="name: Field required"):
        load_config(write(tmp_path, "data: {source: digits}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "exp.yaml"
    path.write_text("name: x\ndata: {source: imagefolder, root: ../imgs}\nbackbone: {weights: w/model.pt}\ncache_dir: c\n")
    cfg = load_config(path)
    assert cfg.data.root == tmp_path / "sub" / ".." / "imgs"
    assert cfg.backbone.weights == str(tmp_path / "sub" / "w" / "model.pt")
    assert cfg.cache_dir == tmp_path / "sub" / "c"


def test_cache_dir_flag_beats_env_beats_file(tmp_path, monkeypatch):
    path = write(tmp_path, f"name: x\ncache_dir: {tmp_path / 'file'}\n")
    assert load_config(path).cache_dir == tmp_path / "file"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert load_config(path).cache_dir == tmp_path / "env"
    assert load_config(path, cache_dir=tmp_path / "flag").cache_dir == tmp_path / "flag"


def test_config_is_frozen(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\n"))
    with pytest.raises(Exception, match="frozen"):
        cfg.name = "y"


@pytest.mark.parametrize("name", ["digits-resnet18.yaml", "demo-source.yaml", "demo-source-digits0to4.yaml", "demo-target.yaml"])
def test_every_shipped_config_is_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.name


def test_the_shipped_sweep_expands_against_the_shipped_config():
    from flows.config import load_sweep

    plan, configs = load_sweep(REPO / "configs" / "digits-resnet18.yaml", REPO / "configs" / "sweep-digits.yaml")
    assert [c.name for c in configs] == ["digits-probes", "digits-lp-ft", "digits-px48", "digits-04-heads-kind_ridge"]
    assert configs[1].finetune.enabled and configs[2].backbone.preprocess.crop == 48
