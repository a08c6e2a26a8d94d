"""Partial fine-tuning: what is frozen stays frozen, LP-FT starts at the probe (kill -9 and resume: test_gpu.py,
on the CPU and on CUDA). The ``staged`` fixture is in conftest.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.backbones.config import resolve
from tasks.backbones.models import build, load_model
from tasks.data.manifest import Manifest
from helpers import state_of
from tasks.finetune.stage import finetune
from tasks.finetune.plan import run_files
from tasks.finetune.surgery import build_optimizer, build_schedule, freeze, init_head_from_probe, unfrozen_modules
from tasks.heads.stage import load_head


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_only_unfrozen_blocks_change_and_frozen_batchnorm_keeps_its_statistics(staged):
    cfg, _, _, plan = staged
    p = plan(unfreeze=["layer4"])
    before = load_model(p.backbone, num_classes=3).state_dict()
    result = finetune(p)
    after = state_of(run_files(p).last)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("layer4.", "fc.")) for k in changed)
    assert any(k.startswith("layer4.") for k in changed)
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert result.trainable_params == sum(v.numel() for k, v in before.items() if k.startswith(("layer4.", "fc.")) and "running" not in k and "num_batches" not in k)


def test_discriminative_learning_rates_and_warmup(staged):
    _, _, _, plan = staged
    p = plan(unfreeze=["layer3", "layer4"], lr_head=1e-2, lr_backbone=1e-4)
    model = load_model(p.backbone, num_classes=3)
    params, _ = freeze(model, unfrozen_modules(model, p.finetune, "fc"))
    opt = build_optimizer(model, "fc", p.finetune)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["head"]["lr"] == 1e-2 and groups["backbone"]["lr"] == 1e-4
    assert {id(q) for q in groups["head"]["params"]} == {id(q) for q in model.fc.parameters()}
    backbone_ids = {id(q) for q in groups["backbone"]["params"]}
    assert backbone_ids == {id(q) for n, q in model.named_parameters() if n.startswith(("layer3.", "layer4."))}
    assert len(params) == len(groups["head"]["params"]) + len(groups["backbone"]["params"])
    schedule = build_schedule(opt, p.finetune, steps_per_epoch=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 2)  # step 0 of a 2-step warmup
    for _ in range(2):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 0 / 10)))


def test_last_n_and_unknown_modules(staged):
    _, _, _, plan = staged
    p = plan(last_n=2)
    model = load_model(p.backbone, num_classes=3)
    assert unfrozen_modules(model, p.finetune, "fc") == ["layer3", "layer4", "fc"]
    with pytest.raises(ValueError, match=r"unknown module\(s\) \['layer9'\]; top-level modules of this backbone: conv1, bn1"):
        unfrozen_modules(model, plan(unfreeze=["layer9"]).finetune, "fc")
    from flows.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="finetune.lr_backbone: Input should be greater than 0"):
        parse_config({"name": "x", "finetune": {"lr_backbone": -1e-4}})


def test_lp_ft_head_starts_as_the_probe(staged):
    cfg, feats, probe, plan = staged
    p = plan()
    model = load_model(p.backbone, num_classes=3).eval()
    init_head_from_probe(model, "fc", p.cache_dir, probe)
    manifest = Manifest.load(p.manifest)
    pre = p.backbone.preprocess
    from tasks.data.images import load_rgb

    x = torch.stack([pre(load_rgb(manifest.root / path)) for path, _ in manifest.splits["val"]])
    with torch.no_grad():
        logits = model(pre.normalize(x)).numpy()
        features = build(p.backbone)(pre.normalize(x))["penultimate"].numpy()
    expected = load_head(p.cache_dir, probe).decision_function(features)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_best_checkpoint_is_a_backbone_for_the_next_experiment(staged, tiny_config):
    cfg, _, _, plan = staged
    p = plan()
    result = finetune(p)
    assert result.best_checkpoint.exists() and 0 <= result.best_epoch <= 3
    assert finetune(p).cache_hit
    nxt = tiny_config(backbone={"weights": str(result.best_checkpoint)}, cache_dir=str(cfg.cache_dir / "next"))
    spec = resolve(nxt.backbone)
    model = load_model(p.backbone, num_classes=3)
    model.load_state_dict(state_of(result.best_checkpoint))
    model.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(build(spec)(x)["penultimate"], model.eval()(x), rtol=0, atol=0)


@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_lp_ft_never_ends_below_the_probe_it_starts_from_on_validation(staged):
    """Epoch 0 is the probe on the frozen backbone, validated first: a fine-tune that only makes things worse
    (here a learning rate that wrecks the weights) returns it."""
    cfg, _, probe, plan = staged
    result = finetune(plan(lr_head=50.0, lr_backbone=5.0, warmup_epochs=0))
    first = result.history[0]
    assert first.epoch == 0 and first.train_loss is None and [h.epoch for h in result.history] == [0, 1, 2, 3]
    assert first.val_accuracy == pytest.approx(load_head(cfg.cache_dir, probe).val_accuracy_, abs=1e-9)
    assert all(h.val_accuracy < first.val_accuracy for h in result.history[1:]), result.history
    assert result.best_epoch == 0 and result.best_val_accuracy == first.val_accuracy
    assert result.epochs_run == 3 and finetune(plan(lr_head=50.0, lr_backbone=5.0, warmup_epochs=0)).cache_hit
    # a random head has no probe to keep: training starts at epoch 1
    random = finetune(plan(init_head="random"))
    assert random.history[0].epoch == 1 and random.best_epoch >= 1


def test_fine_tuning_needs_a_probe_or_random_init(staged):
    _, _, _, plan = staged
    p = plan().model_copy(update={"probes": []})
    with pytest.raises(ValueError, match="init_head is best_probe but no linear probe was trained"):
        finetune(p)
@pytest.mark.slow  # seconds of training or subprocesses: the full suite runs it
def test_freeze_bn_all_keeps_every_batchnorm_statistic(staged):
    _, _, _, plan = staged
    p = plan(unfreeze=["layer4"], freeze_bn="all", epochs=1)
    before = load_model(p.backbone, num_classes=3).state_dict()
    finetune(p)
    after = state_of(run_files(p).last)
    stats = [k for k in before if "running_" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])


def test_standardisation_does_not_amplify_dead_features():
    from tasks.heads.linear import LogisticHead

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    X[:, 3] = 1.0 + rng.normal(0, 1e-6, 200)  # a dead unit with float noise
    y = (X[:, 0] > 0).astype(int)
    head = LogisticHead(C=(1.0,)).fit(X, y)
    assert head.scale_[3] >= 1e-2 * np.median(X.std(axis=0)) * 0.99
    assert np.abs(head.coef_ / head.scale_).max() < 1e3


def test_a_search_is_a_grid_of_validated_candidates():
    from tasks.finetune.plan import FinetuneConfig

    cfg = FinetuneConfig(enabled=True, search={"lr_backbone": [1e-4, 1e-5], "last_n": [1, 2]})
    found = cfg.candidates()
    assert [label for label, _ in found] == ["lr_backbone=0.0001 last_n=1", "lr_backbone=0.0001 last_n=2",
                                            "lr_backbone=1e-05 last_n=1", "lr_backbone=1e-05 last_n=2"]
    assert all(c.search is None for _, c in found) and found[3][1].lr_backbone == 1e-5 and found[3][1].last_n == 2
    assert FinetuneConfig(enabled=True).candidates() == [("", FinetuneConfig(enabled=True))]
    with pytest.raises(ValueError, match=r"search: \['seed'\] cannot be searched; searchable: lr_backbone"):
        FinetuneConfig(search={"seed": [0, 1]})
    with pytest.raises(ValueError, match=r"search: \['lr_head'\] need a non-empty list"):
        FinetuneConfig(search={"lr_head": []})
    with pytest.raises(ValueError, match=r"finetune.search candidate \{'lr_head': -1.0\}"):
        FinetuneConfig(search={"lr_head": [1e-3, -1.0]}).candidates()


def test_a_candidate_has_the_key_of_the_plain_config_it_equals(staged):
    """The search is not in the key: a candidate with lr_backbone 1e-5 is the run a config that sets it would be."""
    _, _, _, plan = staged
    assert plan(search={"lr_backbone": [1e-4, 1e-5]}).key == plan().key
    searched = dict(plan(search={"lr_backbone": [1e-4, 1e-5]}).finetune.candidates())
    assert plan(lr_backbone=1e-5).key == plan(**searched["lr_backbone=1e-05"].model_dump(
        exclude={"enabled", "search"})).key
