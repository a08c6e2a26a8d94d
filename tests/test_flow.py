"""The extract flow in Prefect's ephemeral mode, and the CLI around it."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.extract import extract_flow
from flows.stages import local_run_settings

pytestmark = pytest.mark.slow


def run(cfg):
    with local_run_settings():
        return extract_flow(cfg)


def test_flow_extracts_every_split_then_hits_the_cache_and_trusts_the_store(tiny_config):
    cfg = tiny_config()
    first = run(cfg)
    assert sorted(first) == ["test", "train", "val"]
    assert not any(r.cache_hit for r in first.values())
    assert sum(r.rows for r in first.values()) == 18

    second = run(cfg)
    assert all(r.cache_hit and r.forward_batches == 0 for r in second.values())
    assert {s: r.key for s, r in second.items()} == {s: r.key for s, r in first.items()}

    first["val"].path.unlink()  # the store is the source of truth: no stale Prefect hit
    third = run(cfg)
    assert not third["val"].cache_hit and third["val"].forward_batches > 0
    assert third["val"].path.exists()
    assert third["train"].cache_hit and third["test"].cache_hit

    removed = CliRunner().invoke(app, ["cache", "rm", third["test"].key[:12], "--cache-dir", str(cfg.cache_dir)])
    assert removed.exit_code == 0, removed.output
    fourth = run(cfg)  # `cache rm` too: no stale Prefect hit
    assert not fourth["test"].cache_hit and fourth["train"].cache_hit


def test_flow_fails_on_bad_data_naming_the_problem(tiny_config, tmp_path):
    cfg = tiny_config(data={"root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="nowhere is not a readable folder"):
        run(cfg)


def test_cli_extract_and_its_errors(tiny_config, tmp_path):
    cfg = tiny_config()
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"name: cli\ndata: {{source: imagefolder, root: {cfg.data.root}}}\n"
        "backbone: {name: resnet18, weights: none, preprocess: {resize: 32, crop: 32}}\n"
        "extract: {batch_size: 8, num_workers: 0}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["extract", str(path), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "computed" in result.output and "train" in result.output
    assert len(list((tmp_path / "c" / "features").glob("*.h5"))) == 3

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nextract: {dtype: float64}\n")
    result = runner.invoke(app, ["extract", str(bad)])
    assert result.exit_code == 2
    assert "extract.dtype: Input should be 'float16' or 'float32'" in result.output

    result = runner.invoke(app, ["extract", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read config" in result.output


def test_every_command_has_help():
    runner = CliRunner()
    for args in (["--help"], ["extract", "--help"], ["demo", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output
