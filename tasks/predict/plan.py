"""The predict plan: the ``predict:`` config, one :class:`PredictPlan` (its key: the model, the new images'
feature key, the calibration and training features, the settings) and the result; the stage imports it.

The new images go through the extraction stage's own plan (content keys and pieces: images already extracted
are read back, a folder that grew extracts only its new pieces). The model is a head's fit, named or the
evaluation's recommendation (chosen on val; which one is known once the evaluation ran, so the key names the
evaluation instead), or the fine-tuned model (``finetuned``, or the recommendation when fine-tuning won): then
every split goes through its checkpoint as a backbone, cached the same way (:func:`with_backbone`), and its
own classifier scores the features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage import keys
from storage.layout import CacheLayout
from storage.records import PredictionFiles
from tasks.data.config import DataConfig
from tasks.declare import Command, Graph, Section, Stage, Unit, Work, against, features
from tasks.extract.plan import SplitPlan, plan_extraction
from tasks.extract.plan import is_stored as extract_stored
from tasks.extract.why import why_features
from tasks.heads.plan import fits
from tasks.result import StagePlan, StageResult

RECOMMENDED = "recommended"
FINETUNED = "finetuned"


class PredictConfig(BaseModel):
    """``predict:`` section: the images to score and how (``transferpipe predict`` flags override it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig | None = Field(None, description="the new images, any data source (labels not needed: "
                                                      "source: files reads every image under a folder)")
    model: str = Field(RECOMMENDED, description="recommended (the evaluation's pick, chosen on val), finetuned "
                                                "or a head's name")
    top_k: int = Field(3, ge=1, le=1000, description="labels and probabilities kept per image")
    coverage: float = Field(0.9, gt=0, lt=1, description="the prediction sets' target coverage (split conformal on val)")
    method: Literal["lac", "aps", "raps"] = Field("lac", description="conformal score: lac (smallest sets), aps "
                                                                   "(adaptive) or raps (aps with a rank penalty)")
    raps_lambda: float = Field(0.01, ge=0, le=10, description="raps: the penalty per rank beyond raps_k")
    raps_k: int = Field(1, ge=0, description="raps: ranks free of the penalty")
    ood_pass: float = Field(0.95, gt=0, lt=1, description="share of val images under the out-of-distribution "
                                                           "threshold (kNN distance to the training features)")
    format: Literal["parquet", "csv"] = Field("parquet", description="the table: parquet or csv (lists joined by |)")
    ood_data: DataConfig | None = Field(None, description="images known to be out of distribution: the OOD score's "
                                                          "AUROC and FPR95 against the test split are measured on them")

    def settings(self) -> dict[str, Any]:
        """What the key holds besides the model and the features (RAPS's penalty only for raps: the keys of lac
        and aps predictions are as before it existed)."""
        raps = set() if self.method == "raps" else {"raps_lambda", "raps_k"}
        return self.model_dump(mode="json", exclude={"data", "model", "ood_data", *raps})

    def penalty(self) -> tuple[float, int]:
        """RAPS's ``(lambda, k_reg)``; no penalty for the other methods."""
        return (self.raps_lambda, self.raps_k) if self.method == "raps" else (0.0, 0)


class PredictPlan(StagePlan):
    experiment: str
    data: SplitPlan  # the new images' extraction
    ood: SplitPlan | None = None  # the OOD set's extraction (predict.ood_data)
    head: str | None = Field(None, description="a named head's fit key; None: the evaluation's recommendation")
    name: str
    evaluation: str | None = Field(None, description="the evaluation's key: whose recommendation is the model, and "
                                                     "whose registry row takes the trust figures")
    splits: dict[str, SplitPlan] = Field(default_factory=dict, description="the experiment's splits' extraction: "
                                         "a fine-tuned model extracts them again through its checkpoint")
    train: str
    val: str
    test: str | None
    settings: PredictConfig
    cache_dir: Path

    @property
    def files(self) -> PredictionFiles:
        return PredictionFiles.of(self.cache_dir, self.key)


class PredictResult(StageResult):
    work_fields: tuple[str, ...] = ("rows_scored",)
    key: str
    model: str  # the model's name as the report gives it
    head: str  # its fit key
    layer: str
    rows: int
    single: int  # images whose prediction set holds one label
    empty: int  # images whose set is empty (no label reaches the coverage's threshold)
    ood: int  # images flagged out of distribution
    bad_images: int
    temperature: float
    threshold: float
    ood_threshold: float
    calibration: dict[str, float] = Field(description="val NLL and ECE before and after the temperature, val rows")
    test: dict[str, Any] = Field(default_factory=dict, description="on the test split: coverage (marginal, per "
                                                                   "class, by rank of the true class), set size")
    path: Path
    rows_scored: int = 0


def resolve_head(graph: Graph, name: str, field_name: str = "predict.model") -> tuple[str | None, str]:
    """The named head's fit key (all labels, first seed), or None for the recommendation; refuses an unknown name
    listing the known ones and how to train one."""
    if name == RECOMMENDED:
        return None, name
    plans = graph["heads"].plans() if "heads" in graph else []
    known = [p.label for p in plans]
    if name == FINETUNED:
        if "finetune" not in graph or not graph["finetune"].plans():
            raise ValueError(f"{field_name} {FINETUNED}: this config fine-tunes nothing; set finetune: {{enabled: "
                             f"true}} (and run transferpipe run CONFIG), or name a head: {', '.join(known) or 'none'}")
        return None, name
    match = next((p for p in plans if p.label == name), None)
    if match is None:
        raise ValueError(f"{field_name} {name!r}: no such head; heads: {', '.join(known) or 'none'} or "
                         f"{RECOMMENDED}{f' or {FINETUNED}' if 'finetune' in graph else ''} (add it to heads: "
                         "and run transferpipe heads CONFIG)")
    fit = next(((shot, key) for shot, _, key in fits(match) if shot == "all"), None) or fits(match)[0][::2]
    return fit[1], name


def _outside_the_cache(root: Path | None, cache_dir: Path) -> None:
    """Images to score live outside the cache folder (the bundled datasets it writes excepted)."""
    cache = Path(cache_dir).expanduser().resolve()
    where = Path(root).resolve() if root is not None else None
    bundled = CacheLayout(cache).datasets()
    if where is not None and (where == cache or cache in where.parents) and bundled not in where.parents:
        raise ValueError(f"predict.data.root {root} is inside the cache folder {cache}; score images kept elsewhere")


def _plan(config: Any, graph: Graph) -> list[Work]:
    wanted = config.predict or PredictConfig()
    if wanted.data is None:
        raise ValueError("predict.data: no images to score; set predict.data (for example {source: files, root: "
                         "FOLDER}) or pass --data FOLDER")
    _outside_the_cache(wanted.data.root, config.cache_dir)
    split = features(graph)
    if "val" not in split:
        raise ValueError("predict: calibrates on the val split; set data.val_fraction > 0 or add a val folder")
    data = wanted.data.model_copy(update={"val_fraction": 0.0, "test_fraction": 0.0})  # every image is scored
    new = plan_extraction(data, config.backbone, config.extract, config.cache_dir)["train"]
    ood = None
    if wanted.ood_data is not None:
        _outside_the_cache(wanted.ood_data.root, config.cache_dir)
        ood = plan_extraction(wanted.ood_data.model_copy(update={"val_fraction": 0.0, "test_fraction": 0.0}),
                              config.backbone, config.extract, config.cache_dir)["train"]
    head, name = resolve_head(graph, wanted.model)
    evaluation = graph["evaluate"].works[0].plan.key  # whose recommendation, or whose registry row takes the trust
    settings = wanted.settings() | ({"ood_data": ood.key} if ood else {})
    model = {"head": head} if head else {"finetuned_by" if name == FINETUNED else "recommended_by": evaluation}
    spec = keys.predict_spec(model, new.key, split["val"].key,
                             split["train"].key, settings)
    plan = PredictPlan(key=keys.key(spec), spec=spec, experiment=config.name, data=new, ood=ood, head=head, name=name,
                       evaluation=evaluation, train=split["train"].key, val=split["val"].key,
                       test=split["test"].key if "test" in split else None, settings=wanted,
                       cache_dir=Path(config.cache_dir),
                       splits={w.what: w.plan for w in graph["extract"].works})
    return [Work(config.name, plan, is_stored(plan))]


def _units(work: Work) -> list[Unit]:
    """The new images' features (the extraction's pieces, written by this stage) and the predictions."""
    data, ood = work.plan.data, work.plan.ood
    return [Unit(f"{work.what} new images", data.key, extract_stored(data), data.spec),
            *([Unit(f"{work.what} OOD set", ood.key, extract_stored(ood), ood.spec)] if ood else []),
            Unit(work.what, work.plan.key, work.stored, work.plan.spec)]


def _why(config: Any, missing: list[tuple[Work, Unit]]) -> list[list[str]]:
    """Features: what the extraction says (data added, pieces to extract); predictions: the closest stored spec."""
    tables = [(w, u) for w, u in missing if u.key == w.plan.key]
    reasons = iter(against("predict")(config, tables))
    def features_of(w: Work, u: Unit) -> Any:
        return w.plan.data if u.key == w.plan.data.key else w.plan.ood

    return [why_features(config.cache_dir, "train", features_of(w, u).manifest, u.spec, features_of(w, u).pieces)
            if u.key != w.plan.key else next(reasons) for w, u in missing]


def is_stored(plan: PredictPlan) -> bool:
    saved = plan.files.read_result()
    return bool(saved) and plan.files.table(plan.settings.format).is_file()


def _show(config: Any, results: list[PredictResult]) -> tuple[str, list[str], list[list[Any]], list[str]]:
    r = results[0]
    cal = r.calibration
    rows = [["images scored", f"{r.rows:,}" + (" (cached)" if r.cache_hit else "")],
            ["single-label sets", f"{r.single:,} ({r.single / max(r.rows, 1):.1%})"],
            ["empty sets", f"{r.empty:,}"],
            ["flagged out of distribution", f"{r.ood:,} ({r.ood / max(r.rows, 1):.1%})"],
            ["images that failed to decode", f"{r.bad_images:,}"],
            ["temperature (val NLL before -> after)", f"{r.temperature:.3f} ({cal['nll_before']:.3f} -> "
                                                       f"{cal['nll_after']:.3f})"]]
    if r.test:
        rows.append([f"test coverage (target {config.predict.coverage if config.predict else 0.9:g})",
                     f"{r.test['coverage']:.3f}, mean set size {r.test['mean_set_size']:.2f}"])
    if r.test.get("ood"):
        rows.append([f"OOD score on {int(r.test['ood']['ood_rows'])} known-OOD images vs test",
                     f"AUROC {r.test['ood']['auroc']:.3f}, FPR95 {r.test['ood']['fpr95']:.3f}"])
    where = [f"predictions: {r.path}", f"how far to trust them: {PredictionFiles(r.path.parent).report}"]
    return f"predictions of {r.model} ({r.layer}) for {config.name}", ["figure", "value"], rows, where


STAGE = Stage("predict", _plan, "tasks.predict.stage:predict", "predict", lambda c, w: f"predict-{c.name}",
              after=("extract", "quality", "heads", "finetune", "evaluate"), joins=("evaluate",),
              when=lambda c, path: c.predict is not None, units=_units, why=_why, stored=is_stored,
              device=lambda p: p.data.extract.device,
              section=Section("predict", PredictConfig | None, Field(
                  None, description="transferpipe predict: new images scored with the chosen model (a run too when set)")),
              command=Command("Score new images with the recommended model (or --model NAME): top-k labels, calibrated "
                              "probabilities, conformal prediction sets and out-of-distribution flags, as Parquet.",
                              flags=("model", "top_k", "coverage", "method", "format"), data_flag=True, out_flag=True,
                              show=_show),
              imports=frozenset({"data", "backbones", "extract", "heads", "evaluate"}))
