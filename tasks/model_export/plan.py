"""The model-export plan: the ``export_model:`` config, one :class:`ModelExportPlan` (its key: the model, the
backbone's weights, the features its trust is fitted on, the trust settings, the formats) and the result.

The model is a head on the frozen backbone, named or the evaluation's recommendation; its temperature,
conformal threshold and OOD bank are fitted as ``predict`` fits them (``predict:``'s settings, or their
defaults), so an exported model gives the same probabilities, sets and flags as ``predict``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.records import ModelFiles
from tasks.backbones.config import BackboneSpec, resolve
from tasks.declare import Command, Graph, Section, Stage, Unit, Work, against, features
from tasks.extract.plan import SplitPlan
from tasks.predict.plan import FINETUNED, RECOMMENDED, PredictConfig, resolve_head
from tasks.result import StagePlan, StageResult

Format = Literal["onnx", "pt2"]


class ModelExportConfig(BaseModel):
    """``export_model:`` section (``transferpipe export-model`` flags override it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(RECOMMENDED, description="recommended (the evaluation's pick, chosen on val), finetuned "
                                                "or a head's name")
    formats: list[Format] = Field(default_factory=lambda: ["onnx", "pt2"],
                                  description="onnx (opset 18, dynamic batch) and/or pt2 (torch.export)")
    parity_images: int = Field(1000, ge=1, le=100_000, description="test images the exported model is checked on")
    bench: bool = Field(False, description="also measure images/s of each runtime here and recommend the fastest "
                                           "(not in the key)")


class ModelExportPlan(StagePlan):
    experiment: str
    head: str | None
    name: str
    evaluation: str | None
    backbone: BackboneSpec
    train: str
    val: str
    test: str
    test_manifest: Path
    trust: PredictConfig
    settings: ModelExportConfig
    cache_dir: Path
    splits: dict[str, SplitPlan] = Field(default_factory=dict, description="the experiment's splits' extraction: "
                                         "the fine-tuned network extracts train and val again through its checkpoint")

    @property
    def files(self) -> ModelFiles:
        return ModelFiles.of(self.cache_dir, self.key)


class ModelExportResult(StageResult):
    key: str
    model: str
    head: str
    kind: str
    folder: Path
    files: dict[str, int] = Field(description="file name: size in bytes")
    parity: dict[str, Any] = Field(description="per format: images, top-1 agreement, largest |probability "
                                               "difference|, set and OOD flag agreement")
    exported: int = 0
    work_fields: tuple[str, ...] = ("exported",)


def _plan(config: Any, graph: Graph) -> list[Work]:
    wanted = config.export_model or ModelExportConfig()
    split = features(graph)
    missing = [s for s in ("train", "val", "test") if s not in split]
    if missing:
        raise ValueError(f"export-model: fits its trust on val and checks parity on test; this config has no "
                         f"{', '.join(missing)} split (set data.val_fraction and data.test_fraction > 0)")
    head, name = resolve_head(graph, wanted.model, "export_model.model")
    evaluation = graph["evaluate"].works[0].plan.key  # whose pick it is, and whose test metrics the card gives
    backbone = resolve(config.backbone, config.cache_dir)
    trust = config.predict or PredictConfig()
    model = {"head": head} if head else {"finetuned_by" if name == FINETUNED else "recommended_by": evaluation}
    spec = keys.model_export_spec(model, backbone.weights_id,
                                  split["val"].key, split["train"].key, split["test"].key,
                                  trust.settings() | wanted.model_dump(mode="json", exclude={"model", "bench"}))
    plan = ModelExportPlan(key=keys.key(spec), spec=spec, experiment=config.name, head=head, name=name,
                           evaluation=evaluation, backbone=backbone, train=split["train"].key,
                           val=split["val"].key, test=split["test"].key, test_manifest=split["test"].manifest,
                           trust=trust, settings=wanted, cache_dir=Path(config.cache_dir),
                           splits={w.what: w.plan for w in graph["extract"].works if w.what in ("train", "val")})
    return [Work(config.name, plan, is_stored(plan))]


def is_stored(plan: ModelExportPlan) -> bool:
    saved = plan.files.read_result()
    folder = plan.files.folder
    return bool(saved) and all((folder / f).is_file() and (folder / f).stat().st_size == n
                               for f, n in saved.get("files", {}).items())


def _show(config: Any, results: list[ModelExportResult]) -> tuple[str, list[str], list[list[Any]], list[str]]:
    r = results[0]
    rows = [[fmt, f"{p['images']}", f"{p['top1_agreement']:.4f}", f"{p['max_abs_prob_diff']:.2e}",
             f"{p['set_agreement']:.4f}", f"{p['ood_agreement']:.4f}"] for fmt, p in r.parity.items()]
    lines = [f"model: {r.folder}", *(f"  {name} ({size / 2**20:.1f} MiB)" for name, size in sorted(r.files.items()))]
    if config.export_model is not None and config.export_model.bench:
        from tasks.model_export import speed

        rates = speed.measure(r.folder)
        lines += ["images/s here (ratio to torch eager): runtime, batch 1, batch 32",
                  *("  " + ", ".join(row) for row in speed.rows(rates)), f"fastest here: {speed.recommend(rates)}"]
    return (f"{r.model} ({r.kind}) exported{' (cached)' if r.cache_hit else ''}: parity with transferpipe on test",
            ["format", "images", "top-1 agreement", "max |dp|", "sets equal", "OOD flags equal"], rows, lines)


STAGE = Stage("export-model", _plan, "tasks.model_export.stage:export_model", "export-model",
              lambda c, w: f"export-model-{c.name}", after=("extract", "quality", "heads", "finetune", "evaluate"),
              units=lambda w: [Unit(f"{w.what} {w.plan.name}", w.plan.key, w.stored, w.plan.spec)],
              why=against("export-model"), stored=is_stored, side_goal=True,
              section=Section("export_model", ModelExportConfig | None, Field(
                  None, description="transferpipe export-model: the chosen model as ONNX / torch.export with its "
                                    "preprocessing, temperature, conformal threshold and OOD detector inside")),
              command=Command("The chosen model (backbone + head, with its temperature, conformal threshold and OOD "
                              "detector inside) as one folder other runtimes load: ONNX, torch.export, safetensors, "
                              "config.json and a model card; checked against transferpipe's own predictions.",
                              flags=("model", "formats", "bench"), out_flag=True, out_folder=True, show=_show),
              imports=frozenset({"data", "backbones", "extract", "heads", "evaluate", "predict"}))
