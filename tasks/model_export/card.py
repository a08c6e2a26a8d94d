"""What an exported model says of itself: ``config.json`` (timm's ``pretrained_cfg`` vocabulary plus the trust it
carries) and ``README.md``, the model card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storage.keys import short
from tasks.machine import versions


def timm_config(plan: Any, spec: Any, facts: dict[str, Any]) -> dict[str, Any]:
    pre, fitted = spec.preprocess, facts["fitted"]
    from storage.features import FeatureStore

    classes = FeatureStore(plan.cache_dir).rows(plan.train, facts["layer"]).classes
    return {
        "architecture": spec.name, "num_classes": len(classes), "label_names": classes,
        "mean": list(pre.mean), "std": list(pre.std), "input_size": [3, pre.crop, pre.crop],
        "interpolation": pre.interpolation, "crop_pct": round(pre.crop / pre.resize, 6), "crop_mode": "center",
        "input": {"dtype": "uint8", "layout": "NCHW", "range": [0, 255]},
        "outside_the_graph": f"decode to RGB, resize the shorter side to {pre.resize} ({pre.interpolation}, "
                             f"antialiased, as PIL does), centre-crop {pre.crop}x{pre.crop}: ONNX's Resize does not "
                             "reproduce PIL's antialiased resize exactly, so it stays out of the graph",
        "inside_the_graph": "scale to [0, 1], normalise (mean, std), backbone, head, temperature, prediction set, "
                            "OOD score",
        "outputs": {"probs": "calibrated class probabilities (N, num_classes)",
                    "set_mask": f"class in the conformal set ({plan.trust.method}, target coverage "
                                f"{plan.trust.coverage})",
                    "ood_score": f"out of distribution above {fitted.ood_threshold:.6g}"},
        "head": {"name": facts["name"], "kind": facts["kind"], "layer": facts["layer"], "key": facts["head"]},
        "trust": {"temperature": fitted.temperature, "threshold": fitted.threshold, "method": plan.trust.method,
                  "coverage": plan.trust.coverage, "ood_threshold": fitted.ood_threshold,
                  "ood_pass": plan.trust.ood_pass},
    }


def model_card(plan: Any, spec: Any, facts: dict[str, Any]) -> str:
    pre, fitted, cal = spec.preprocess, facts["fitted"], facts["fitted"].calibration
    lib = versions()
    return f"""# {facts['name']} on {spec.name} ({plan.experiment})

{_what(spec, facts)}, exported by transferpipe with its calibration inside: outputs `probs` (temperature-scaled probabilities), `set_mask` (the classes in
the conformal prediction set) and `ood_score` (flag above {fitted.ood_threshold:.6g}).

## Input

uint8 RGB images, NCHW, {pre.crop}x{pre.crop}, any batch size. Before the model: decode to RGB, resize the
shorter side to {pre.resize} ({pre.interpolation}, antialiased, as PIL does), centre-crop {pre.crop}. Inside:
scale to [0, 1], normalise with mean {list(pre.mean)} and std {list(pre.std)}.

## Trust

- temperature {fitted.temperature:.6g}, fitted on {int(cal['val_rows'])} val images: NLL {cal['nll_before']:.4f} ->
  {cal['nll_after']:.4f}, ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f};
- prediction sets: split conformal ({plan.trust.method}) on val, target coverage {plan.trust.coverage},
  threshold {fitted.threshold:.6g};
- OOD: one minus the largest cosine similarity to the {len(fitted.bank)} training images' features;
  {plan.trust.ood_pass:.0%} of val pass.

## Test metrics

{_metrics(facts['test'])}

## Parity with transferpipe

On {next(iter(facts['parity'].values()))['images']} test images, decoded as above, against transferpipe's own
path (eager backbone, the head, the predict stage's temperature, sets and OOD score):

| format | images | top-1 agreement | max abs probability difference | sets equal | OOD flags equal |
|---|---|---|---|---|---|
{_parity(facts['parity'])}

## Lineage

{_model_key(facts['head'])}, features: train {short(plan.train)}, val {short(plan.val)}, test
{short(plan.test)}; dataset {short(Path(plan.test_manifest).stem)}; backbone weights {spec.weights_id}; evaluation
{short(plan.evaluation or '')}; export key {short(plan.key)}. Library versions:
{json.dumps(lib)}.

## Load it

```python
import numpy as np, onnxruntime as ort                      # pip install onnxruntime
session = ort.InferenceSession("model.onnx")
images = np.zeros((2, 3, {pre.crop}, {pre.crop}), dtype=np.uint8)          # resized and cropped as above
probs, set_mask, ood_score = session.run(None, {{"images": images}})
```

```python
import torch
model = torch.export.load("model.pt2").module()
probs, set_mask, ood_score = model(torch.zeros(2, 3, {pre.crop}, {pre.crop}, dtype=torch.uint8))
```
"""


def _what(spec: Any, facts: dict[str, Any]) -> str:
    if facts["kind"] == "finetuned":
        return (f"The {spec.name} network fine-tuned by transferpipe (its best checkpoint, "
                f"`{Path(spec.weights).parent.name[:12]}`) with its own classifier on its `{facts['layer']}` features")
    return f"A {facts['kind']} head on the frozen {spec.name} backbone's `{facts['layer']}` features"


def _model_key(key: str) -> str:
    run = key.removeprefix("finetune:")
    return f"fine-tuning run {short(run)}" if run != key else f"head {short(key)}"


def _metrics(metrics: dict[str, Any]) -> str:
    """Top-1 with its 95% bootstrap interval and the other test metrics the evaluation measured."""
    if not metrics:
        return "The evaluation of this experiment holds no test metrics for this model."
    lo, hi = metrics.get("top1_ci") or (None, None)
    interval = f" (95% interval {lo:.3f}-{hi:.3f})" if lo is not None else ""
    rest = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("top5", "balanced_accuracy", "macro_f1", "nll", "ece")
                     if isinstance(metrics.get(k), (int, float)))
    return f"On the test split, as the evaluation measured it: top-1 {metrics['top1']:.3f}{interval}; {rest}."


def _parity(parity: dict[str, Any]) -> str:
    return "\n".join(f"| {fmt} | {p['images']} | {p['top1_agreement']:.4f} | {p['max_abs_prob_diff']:.2e} | "
                     f"{p['set_agreement']:.4f} | {p['ood_agreement']:.4f} |" for fmt, p in parity.items())
