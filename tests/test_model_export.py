"""``transferpipe export-model``: the exported folder loads in onnxruntime and torch at any batch size and
predicts what transferpipe predicts (probabilities, sets, OOD flags), from decoded images; bad input is one
line and leaves nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_imagefolder

from flows.execution.local import local_run_settings

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")


@pytest.fixture
def exported(tmp_path, tiny_config):
    """A tiny experiment with a logistic head (l2 features) and a kNN head, exported once (onnx and pt2)."""
    from flows.pipeline import pipeline_flow

    images = make_imagefolder(tmp_path / "labelled", n_per_class=20)
    make = lambda **over: tiny_config(  # noqa: E731
        data={"root": str(images)}, heads=[{"kind": "logistic", "C": [1.0], "preprocess": "l2"}, {"kind": "knn", "k": [3]},
                                         {"kind": "prototype"}],
        predict={"coverage": 0.8}, export_model={"model": "logistic", **over})
    with local_run_settings():
        result = pipeline_flow(make(), stop_after="export-model").outputs["export-model"][0]
    return result, make


@pytest.mark.slow
def test_the_exported_model_runs_at_any_batch_size_and_matches_transferpipe(exported):
    import onnxruntime as ort
    import torch

    from tasks.backbones.config import resolve
    from tasks.data.manifest import Manifest

    result, make = exported
    cfg = make()
    assert result.parity["onnx"]["top1_agreement"] == 1.0 and result.parity["onnx"]["max_abs_prob_diff"] <= 1e-4
    assert result.parity["pt2"]["set_agreement"] == 1.0 and result.parity["onnx"]["ood_agreement"] == 1.0
    folder = result.folder
    assert {"model.onnx", "model.pt2", "model.safetensors", "config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["class0", "class1", "class2"]
    assert config["input_size"] == [3, 32, 32] and config["crop_pct"] == 1.0 and config["trust"]["method"] == "lac"
    card = (folder / "README.md").read_text()
    assert "ort.InferenceSession" in card and "torch.export.load" in card and "| onnx |" in card
    assert "On the test split, as the evaluation measured it: top-1 " in card and "95% interval" in card

    pre = resolve(cfg.backbone, cfg.cache_dir).preprocess
    manifest = Manifest.load(_test_manifest(cfg))
    images = torch.stack([pre(manifest.image(item)) for item, _ in manifest.splits["test"]])
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(folder / "model.pt2")).module()
    whole = session.run(None, {"images": images.numpy()})
    for n in (1, 2, 7, 64):
        batch = images[:n] if n <= len(images) else images[torch.arange(n) % len(images)]
        probs, mask, ood = session.run(None, {"images": batch.numpy()})
        assert probs.shape == (n, 3) and mask.shape == (n, 3) and ood.shape == (n,)
        assert np.allclose(probs.sum(1), 1, atol=1e-5)
        torch_probs = program(batch)[0].numpy()
        assert np.abs(torch_probs - probs).max() < 1e-4
    assert np.abs(whole[0][:1] - session.run(None, {"images": images[:1].numpy()})[0]).max() < 1e-5


@pytest.mark.slow
def test_the_fine_tuned_network_exports_and_predicts_what_it_predicts(tmp_path, tiny_config):
    """``model: finetuned``: the best checkpoint is the exported backbone and its classifier the linear layer; the
    ONNX model's probabilities on decoded test images equal the fine-tuned network run end to end (softmax of
    its logits over the val temperature) within 1e-4."""
    import onnxruntime as ort
    import torch

    from flows.pipeline import pipeline_flow
    from storage import checkpoints
    from tasks.backbones.config import resolve
    from tasks.backbones.models import load_model
    from tasks.data.manifest import Manifest

    images = make_imagefolder(tmp_path / "labelled", n_per_class=20)
    tune = {"enabled": True, "epochs": 2, "batch_size": 8, "num_workers": 0, "warmup_epochs": 0.5,
            "early_stopping": None}
    cfg = tiny_config(data={"root": str(images)}, heads=[{"kind": "logistic", "C": [1.0]}], finetune=tune,
                      predict={"coverage": 0.8}, export_model={"model": "finetuned", "formats": ["onnx"]})
    with local_run_settings():
        ran = pipeline_flow(cfg, stop_after="export-model")
    result = ran.outputs["export-model"][0]
    assert result.model == "finetuned" and result.kind == "finetuned" and result.head.startswith("finetune:")
    assert result.parity["onnx"]["top1_agreement"] == 1.0 and result.parity["onnx"]["max_abs_prob_diff"] <= 1e-4
    card = (result.folder / "README.md").read_text()
    assert "network fine-tuned by transferpipe" in card and "fine-tuning run " in card and "top-1 " in card
    spec = resolve(cfg.backbone, cfg.cache_dir)
    model = load_model(spec, num_classes=3)
    model.load_state_dict(checkpoints.load(ran.outputs["finetune"][0].best_checkpoint)["model"])
    manifest = Manifest.load(_test_manifest(cfg))
    batch = torch.stack([spec.preprocess(manifest.image(item)) for item, _ in manifest.splits["test"]])
    temperature = json.loads((result.folder / "config.json").read_text())["trust"]["temperature"]
    with torch.inference_mode():
        expected = torch.softmax(model.eval()(spec.preprocess.normalize(batch)).double() / temperature, 1).numpy()
    session = ort.InferenceSession(str(result.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"images": batch.numpy()})[0]
    assert np.abs(probs - expected).max() < 1e-4


def _test_manifest(cfg) -> Path:
    from tasks.extract.plan import plan_extraction

    return plan_extraction(cfg.data, cfg.backbone, cfg.extract, cfg.cache_dir)["test"].manifest


@pytest.mark.slow
def test_a_second_export_is_a_hit_and_bad_input_is_one_line(exported, tmp_path):
    from flows.pipeline import pipeline_flow

    result, make = exported
    with local_run_settings():
        again = pipeline_flow(make(), stop_after="export-model").outputs["export-model"][0]
        assert again.cache_hit and again.exported == 0 and again.folder == result.folder
        knn = pipeline_flow(make(model="knn"), stop_after="export-model").outputs["export-model"][0]
        assert knn.kind == "knn" and knn.parity["onnx"]["top1_agreement"] == 1.0
        assert knn.parity["onnx"]["max_abs_prob_diff"] <= 1e-4 and knn.parity["pt2"]["set_agreement"] == 1.0
        proto = pipeline_flow(make(model="prototype"), stop_after="export-model").outputs["export-model"][0]
        assert proto.kind == "prototype" and proto.parity["onnx"]["ood_agreement"] == 1.0
        with pytest.raises(ValueError, match=r"export_model.model 'nope': no such head; heads: logistic, knn, prototype"):
            pipeline_flow(make(model="nope"), stop_after="export-model")
    assert not list((make().cache_dir / "models").glob("*.tmp-*"))  # nothing half-written


def test_the_export_extra_missing_is_named(monkeypatch):
    from tasks.model_export.stage import _require_onnx

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    with pytest.raises(ValueError, match=r"needs the export extra \(onnxscript is missing\): pip install "
                                         r"'transferpipe\[export\]'"):
        _require_onnx()


def test_every_head_kind_exports_and_another_is_refused_by_name():
    from tasks.heads.estimators import HEADS
    from tasks.heads.grid import GridHead
    from tasks.model_export.network import exportable_kinds, head_form

    assert exportable_kinds() == sorted(HEADS)

    class Quadratic(GridHead):
        state_keys = ("w_",)

        @staticmethod
        def _scores_with(state, X):
            return (X @ state["w_"]) ** 2

    with pytest.raises(ValueError, match=r"a quadratic head cannot be exported yet; kinds that export: knn, linear"):
        head_form(Quadratic(), "quadratic")


@pytest.mark.slow
def test_the_command_refuses_an_existing_out_and_copies_the_folder(exported, tmp_path):
    import yaml

    result, make = exported
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(json.loads(make().model_dump_json())))
    env = {"PREFECT_HOME": str(tmp_path / "home"), "DO_NOT_TRACK": "1", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)

    out = tmp_path / "shipped"
    out.mkdir()
    refused = cli("export-model", str(path), "--out", str(out))
    assert refused.returncode == 2 and "exists; choose a new folder or pass --force" in refused.stderr
    bad = cli("export-model", str(path), "--formats", "onnx,tflite")
    assert bad.returncode == 2 and "--formats 'tflite': use one or more of onnx, pt2" in bad.stderr
    done = cli("export-model", str(path), "--out", str(out), "--force")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(cached)" in done.stdout and (out / "model.onnx").is_file() and not (out / "spec.json").exists()


def test_bench_never_recommends_a_runtime_slower_than_eager():
    from tasks.model_export.speed import recommend, rows

    rates = {"torch eager": {1: 100.0, 32: 600.0}, "onnxruntime": {1: 90.0, 32: 2000.0},
             "torch.compile": {1: 120.0, 32: 700.0}}
    assert recommend(rates) == "torch.compile"  # onnxruntime is faster at 32 but slower at batch 1
    assert recommend({"torch eager": {1: 1.0, 32: 1.0}, "onnxruntime": {1: 0.5, 32: 0.5}}) == "torch eager"
    assert rows(rates)[1] == ["onnxruntime", "90 (0.90x)", "2,000 (3.33x)"]


@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_the_sets_inside_the_network_are_predicts_sets(method):
    """The exported graph's ``set_mask`` is tasks.predict.trust's sets for every method (RAPS's rank penalty
    inside the graph too), on a small linear model over random features."""
    import torch

    from tasks.model_export.network import Exported
    from tasks.predict import trust
    from tasks.predict.stage import FinetunedClassifier

    class Flat(torch.nn.Module):
        def forward(self, x):
            return {"penultimate": x.flatten(1)[:, :12]}

    rng = np.random.default_rng(0)
    head = FinetunedClassifier(rng.normal(size=(6, 12)), rng.normal(size=6))
    penalty = (0.05, 1)
    module = Exported(Flat(), "penultimate", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), head, "finetuned", 1.3, 0.8, method,
                      rng.normal(size=(20, 12)), penalty).eval()
    images = torch.as_tensor(rng.integers(0, 256, size=(64, 3, 2, 2)), dtype=torch.uint8)
    probs, mask, _ = (t.numpy() for t in module(images))
    expected = trust.sets(probs.astype(np.float64), 0.8, method, penalty)
    assert (mask == expected).all() and 0 < expected.sum(1).mean() < 6
