"""The export-model stage: the chosen head on its frozen backbone (or the fine-tuned network: its checkpoint as
the backbone, its own classifier), with its trust, as one folder other runtimes load, and proof that it predicts
what transferpipe predicts.

Written into a temporary folder and renamed into ``models/<key>/`` only when every format passed its parity
check on the test split (``StageFiles.staged``): a failed check leaves nothing behind and names the figures.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
import warnings
from typing import Any

import numpy as np

from storage.head_store import read_meta
from storage.records import ModelFiles
from tasks.heads.stage import load_head
from tasks.model_export.card import model_card, timm_config
from tasks.model_export.plan import ModelExportPlan, ModelExportResult, is_stored
from tasks.backbones.config import PENULTIMATE
from tasks.predict.stage import FINETUNE_PREFIX, chosen_model, finetuned_model, fit_trust, model_and_shots

log = logging.getLogger("transferpipe.export_model")
OUTPUTS = ["probs", "set_mask", "ood_score"]
MAX_PROB_DIFF = 1e-4


def export_model(plan: ModelExportPlan) -> ModelExportResult:
    started = time.perf_counter()
    if is_stored(plan):
        return ModelExportResult.model_validate({**plan.files.read_result(), "folder": plan.files.folder,
                                                 "cache_hit": True, "seconds": 0.0})
    import torch

    from tasks.backbones.models import build
    from tasks.model_export.network import Exported

    key, name = chosen_model(plan)
    if key.startswith(FINETUNE_PREFIX):  # the fine-tuned network: its checkpoint as the backbone, its classifier
        backbone, splits, head = finetuned_model(plan.cache_dir, plan.backbone, plan.splits,
                                                 key.removeprefix(FINETUNE_PREFIX))
        layer, kind, val, train = PENULTIMATE, "finetuned", splits["val"].key, splits["train"].key
    else:
        meta = read_meta(plan.cache_dir, key)
        head, layer, kind = load_head(plan.cache_dir, key), meta["layer"], meta["kind"]
        backbone, val, train = plan.backbone, plan.val, plan.train
    fitted = fit_trust(plan.cache_dir, head, layer, val, train, plan.trust)
    spec = dataclasses.replace(backbone, layers=(layer,))
    backbone = build(spec)
    pre = spec.preprocess
    module = Exported(backbone, layer, pre.mean, pre.std, head, kind, fitted.temperature, fitted.threshold,
                      plan.trust.method, fitted.bank, plan.trust.penalty()).eval()
    images = _test_images(plan, pre)
    with plan.files.staged(sound=lambda: is_stored(plan)) as staged, torch.inference_mode():
        written = _write(module, staged, images[:2], plan.settings.formats)
        parity = _parity(plan, module, staged, images, fitted, head, spec, layer)
        facts = {"name": name, "kind": kind, "layer": layer, "head": key, "fitted": fitted, "parity": parity,
                 "test": _test_metrics(plan, name)}
        (staged.file("config.json")).write_text(json.dumps(timm_config(plan, spec, facts), indent=2) + "\n")
        (staged.file("README.md")).write_text(model_card(plan, spec, facts))
        files = {p.name: p.stat().st_size for p in sorted(staged.folder.iterdir())
                 if p.name not in ("spec.json", "result.json")}
        result = ModelExportResult(key=plan.key, model=name, head=key, kind=kind, folder=plan.files.folder,
                                   files=files, parity=parity, exported=len(written), cache_hit=False, seconds=0.0)
        staged.write_spec(plan.spec)
        staged.write_result(result.model_dump_json(exclude={"folder", "cache_hit", "seconds", "work_fields"}))
    return result.model_copy(update={"seconds": time.perf_counter() - started})


def _test_metrics(plan: ModelExportPlan, name: str) -> dict[str, Any]:
    """The model's test metrics as the evaluation measured them (top-1 with its 95% interval), or {} without one."""
    from storage.layout import CacheLayout
    from storage.records import ReportFiles

    saved = ReportFiles(CacheLayout(plan.cache_dir).report(plan.experiment, plan.evaluation or "")).read_result()
    model, shots = model_and_shots(name)
    found = [m for m in (saved or {}).get("models", []) if m.get("name") == model and str(m.get("shot")) == shots]
    return found[0]["metrics"] if found else {}


def _test_images(plan: ModelExportPlan, pre: Any) -> Any:
    """Up to ``parity_images`` test images, decoded, resized and cropped as extraction does: uint8 (N, 3, H, W)."""
    import torch

    from tasks.data.manifest import Manifest

    manifest = Manifest.load(plan.test_manifest)
    items = manifest.splits["test"][: plan.settings.parity_images]
    return torch.stack([pre(manifest.image(item)) for item, _ in items])


def _write(module: Any, out: ModelFiles, example: Any, formats: list[str]) -> list[str]:
    """The weights (safetensors) and each asked format; every format takes any batch size."""
    import torch
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out.file("model.safetensors")))
    batch = torch.export.Dim("batch", min=1, max=65536)
    written = []
    # the feature extractor keeps its hooks' outputs in a dict attribute for one call: harmless when traced
    warnings.filterwarnings("ignore", message=r"The tensor attribute self\.backbone\._captured")
    if "pt2" in formats:
        program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
        torch.export.save(program, str(out.file("model.pt2")))
        written.append("pt2")
    if "onnx" in formats:
        _require_onnx()
        torch.onnx.export(module, (example,), str(out.file("model.onnx")), input_names=["images"],
                          output_names=OUTPUTS, dynamic_shapes={"images": {0: batch}}, opset_version=18,
                          dynamo=True, external_data=False, verbose=False)
        written.append("onnx")
    return written


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"export-model --formats onnx needs the export extra ({exc.name} is missing): "
                         "pip install 'transferpipe[export]'") from None


def _parity(plan: ModelExportPlan, module: Any, out: ModelFiles, images: Any, fitted: Any, head: Any, spec: Any,
            layer: str) -> dict[str, Any]:
    """Each format's outputs against transferpipe's own path on the same decoded test images; raises (nothing
    is published) when top-1, the sets or the OOD flags differ anywhere or a probability by more than 1e-4."""
    from tasks.model_export.network import reference

    probs, sets, ood = reference(module.backbone, layer, spec.preprocess, head, fitted.temperature,
                                 fitted.threshold, plan.trust.method, fitted.bank, images,
                                 plan.trust.penalty())
    found = {}
    for fmt, outputs in _run_formats(out, images, plan.settings.formats):
        p, m, o = (np.asarray(x) for x in outputs)
        figures = {"images": int(len(images)), "top1_agreement": float((p.argmax(1) == probs.argmax(1)).mean()),
                   "max_abs_prob_diff": float(np.abs(p - probs).max()),
                   "set_agreement": float((m.astype(bool) == sets).all(axis=1).mean()),
                   "ood_agreement": float(((o > fitted.ood_threshold) == (ood > fitted.ood_threshold)).mean()),
                   "max_abs_ood_diff": float(np.abs(o - ood).max())}
        found[fmt] = figures
        if (figures["top1_agreement"] < 1 or figures["set_agreement"] < 1 or figures["ood_agreement"] < 1
                or figures["max_abs_prob_diff"] > MAX_PROB_DIFF):
            raise ValueError(f"export-model: the {fmt} model does not reproduce transferpipe's predictions on "
                             f"{len(images)} test images: {figures}; nothing was published")
    return found


def _run_formats(out: ModelFiles, images: Any, formats: list[str]):
    """``(format, (probs, set_mask, ood_score))`` of each written format on ``images``, in batches of 64."""
    import torch

    def batched(run) -> list[np.ndarray]:
        parts = [run(images[i:i + 64]) for i in range(0, len(images), 64)]
        return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(3)]

    if "onnx" in formats:
        import onnxruntime as ort

        session = ort.InferenceSession(str(out.file("model.onnx")), providers=["CPUExecutionProvider"])
        yield "onnx", batched(lambda x: session.run(OUTPUTS, {"images": x.numpy()}))
    if "pt2" in formats:
        program = torch.export.load(str(out.file("model.pt2"))).module()
        yield "pt2", batched(lambda x: [t.numpy() for t in program(x)])

