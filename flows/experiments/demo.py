"""``transferpipe demo``: what transfer learning buys, offline, in a few minutes on 2 cores.

1. demo-source: pretrain resnet18 (random init, 32 px) on clean digits (half 1);
2. demo-target-pretrained: the other half, rendered by a second scanner, with
   the source checkpoint as a frozen backbone: heads at 1/5/10/all shots + LP-FT;
3. demo-target-random: the same with a randomly initialised backbone;
4. the comparison per shot count, and where the reports are;
5. a new unlabelled batch scored with the pretrained experiment's recommended model (predict).
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from flows.config import load_config
from flows.pipeline import PipelineResult, pipeline_flow
from flows.experiments.selection import SelectResult, select_flow
from storage.layout import CacheLayout
from tasks.backbones.config import BackboneConfig
from tasks.data.config import DataConfig
from tasks.data.synthetic import write_new_batch
from tasks.predict.plan import PredictConfig, PredictResult
from tasks.quality.plan import QualityConfig, QualityResult
from tasks.select.plan import SelectConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the checkout's configs/ (flows/experiments/demo.py)


class DemoResult(BaseModel):
    source: PipelineResult
    pretrained: PipelineResult
    random: PipelineResult
    checkpoint: Path
    quality: QualityResult | None = None  # what the quality stage finds in the target data
    predictions: PredictResult | None = None  # the new unlabelled batch, scored with the recommended model
    #: of the batch's pictures of another kind (``other/``) and its digits (``scanner2/``), how many were flagged
    flagged: dict[str, list[int]] = {}


@flow(name="demo", flow_run_name="demo")
def demo_flow(cache_dir: Path | None = None) -> DemoResult:
    for name in ("demo-source.yaml", "demo-target.yaml"):
        if not (CONFIGS / name).is_file():
            raise FileNotFoundError(f"{CONFIGS / name} is missing; run the demo from a source checkout (pip install -e .)")
    source = load_config(CONFIGS / "demo-source.yaml", cache_dir=cache_dir)
    target = load_config(CONFIGS / "demo-target.yaml", cache_dir=cache_dir)
    src = pipeline_flow(source)
    pretrained = target.model_copy(update={
        "name": "demo-target-pretrained",
        "backbone": target.backbone.model_copy(update={"weights": str(src.finetune_checkpoint)}),
    })
    ran = pipeline_flow(pretrained)
    # the target data through the pretrained backbone's cached features: no forward pass
    checked = pipeline_flow(pretrained.model_copy(update={"quality": QualityConfig()}), stop_after="quality")
    random = pipeline_flow(target.model_copy(update={"name": "demo-target-random"}))
    # the last mile: a batch of unlabelled images arrives (new second-scanner digits and a few pictures of another
    # kind); the recommended model scores it from the cache, with sets and out-of-distribution flags
    batch = write_new_batch(CacheLayout(pretrained.cache_dir).datasets())
    scored = pipeline_flow(pretrained.model_copy(update={"predict": PredictConfig(
        data=DataConfig(source="files", root=batch), ood_data=DataConfig(source="files", root=batch / "other"))}),
        stop_after="predict").outputs["predict"][0]
    return DemoResult(source=src, pretrained=ran, random=random, checkpoint=src.finetune_checkpoint,
                      quality=checked.quality, predictions=scored, flagged=_flagged(scored.path))


def _flagged(table: Path) -> dict[str, list[int]]:
    """``{folder: [flagged out of distribution, images]}`` of the demo batch's predictions."""
    import pyarrow.parquet as pq

    found: dict[str, list[int]] = {}
    for row in pq.read_table(table, columns=["id", "ood"]).to_pylist():
        counts = found.setdefault(row["id"].split("/")[0], [0, 0])
        counts[0] += bool(row["ood"])
        counts[1] += 1
    return found


class ImagenetDemoResult(BaseModel):
    imagenet: PipelineResult
    random: PipelineResult
    pixels: PipelineResult


@flow(name="demo-imagenet", flow_run_name="demo-imagenet")
def imagenet_demo_flow(cache_dir: Path | None = None) -> ImagenetDemoResult:
    """ImageNet-pretrained EfficientNet-Lite0 vs the same network randomly initialised vs raw pixels, on MNIST-5k."""
    from tasks.zoo import efficientnet_lite0_weights

    path = CONFIGS / "mnist5k-efficientnet-lite0.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the demo from a source checkout (pip install -e .)")
    base = load_config(path, cache_dir=cache_dir)
    weights = efficientnet_lite0_weights()
    no_finetune = base.finetune.model_copy(update={"enabled": False})
    pixels = BackboneConfig(source="python", name="tasks.zoo:pixels", kwargs={"size": 28}, weights="DEFAULT")
    return ImagenetDemoResult(
        imagenet=pipeline_flow(base.model_copy(update={
            "name": "mnist5k-imagenet", "backbone": base.backbone.model_copy(update={"weights": weights})})),
        random=pipeline_flow(base.model_copy(update={"name": "mnist5k-random", "finetune": no_finetune})),
        pixels=pipeline_flow(base.model_copy(update={"name": "mnist5k-pixels", "backbone": pixels,
                                                     "finetune": no_finetune})),
    )


@flow(name="demo-select", flow_run_name="demo-select")
def selection_check_flow(cache_dir: Path | None = None) -> SelectResult:
    """Rank three backbones on the second-scanner target by cheap scores and by probe accuracy.

    Candidates: pretrained on scanner-1 digits (the demo's source), pretrained
    on digits 0-4 only (a known negative-transfer case), random initialisation.
    """
    sources = {name: pipeline_flow(load_config(CONFIGS / f"{name}.yaml", cache_dir=cache_dir)).finetune_checkpoint
               for name in ("demo-source", "demo-source-digits0to4")}
    target = load_config(CONFIGS / "demo-target.yaml", cache_dir=cache_dir)
    base = target.backbone
    candidates = [
        {"label": "scanner1-pretrained", "backbone": base.model_copy(update={"weights": str(sources["demo-source"])})},
        {"label": "digits0-4-pretrained",
         "backbone": base.model_copy(update={"weights": str(sources["demo-source-digits0to4"])})},
        {"label": "random-init", "backbone": base},
    ]
    return select_flow(target.model_copy(update={"name": "demo-select", "select": SelectConfig(candidates=candidates)}))
