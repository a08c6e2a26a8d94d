"""The quality stage: near-duplicates and leaks, label issues and outliers of a dataset, from its feature
files, written as ``findings.json``, ``quality.md`` and one contact sheet per finding under
``quality/<key>/`` (a cached stage: the same features and settings are a hit).

The searches are exact (tasks.quality.search.Exact: every split streamed in chunks against the others) up to
50,000 rows a split, approximate above (tasks.quality.approximate.Projected: principal components and FAISS
inverted lists, near-duplicates re-scored exactly); ``quality.search`` forces either. The label probe on
the training split holds its features in memory (float32): it runs on the exact path within the memory
budget (tasks.machine.memory_budget); elsewhere the kNN vote alone scores the labels, said in the findings.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from typing import Any

import numpy as np

from storage.features import FeatureStore
from tasks.data.config import get as data_source
from tasks.data.manifest import Manifest
from tasks.index.retrieval import Rows
from tasks.machine import memory_budget
from tasks.quality import label_issues as cl
from tasks.quality import pixels
from tasks.quality.plan import QualityPlan, QualityResult, is_stored
from tasks.quality.approximate import EXACT_ROWS, NPROBE, Projected
from tasks.quality.search import Exact, kth_similarity_in_class
from tasks.quality.sheets import draw

log = logging.getLogger("transferpipe.quality")

#: split pairs searched for near-duplicates: within each split, and each later split into each earlier one
ORDER = ("train", "val", "test")
EXACT_COSINE = 1 - 1e-6


def assess(plan: QualityPlan) -> QualityResult:
    started = time.perf_counter()
    if is_stored(plan):
        return QualityResult(**plan.files.read_result(), cache_hit=True, seconds=time.perf_counter() - started)
    store, manifest = FeatureStore(plan.cache_dir), Manifest.load(plan.manifest)
    budget = memory_budget()
    splits = [s for s in ORDER if s in plan.features]
    stored = {s: store.rows(plan.features[s], plan.config.layer) for s in splits}
    rows = {s: Rows.stored(stored[s]) for s in splits}
    ids = {s: store.paths(plan.features[s], checked=True) for s in splits}
    findings: dict[str, Any] = {"classes": manifest.classes, "splits": {s: rows[s].n for s in splits}}
    finder = _finder(plan, rows, budget)
    findings["search"] = {"method": finder.method, **({"dims": plan.config.dims, "nprobe": NPROBE}
                                                       if finder.method == "approximate" else {})}
    # read once, for the probe and the in-class outliers; the approximate path never holds a split
    train = None if finder.method == "approximate" else _held(store, plan, "train", rows["train"], budget)
    findings["duplicates"] = _duplicates(plan, manifest, finder, ids, _identical_rows(stored, ids))
    if plan.config.pixels:
        findings.update(_pixel_duplicates(manifest, finder.rows, ids))
    findings["label_issues"] = _label_issues(plan, train, manifest, finder, ids)
    findings["outliers"] = _outliers(plan, store, train, finder, ids, budget)
    leaked = {p["b"] for found in (findings["duplicates"], findings.get("pixel_duplicates", {}))
              for name, pairs in found.items() if name.endswith("-test") for p in pairs}
    findings["leaked_test"] = sorted(leaked)
    with plan.files.staged(sound=lambda: is_stored(plan)) as staged:
        sheets = _sheets(staged, manifest, findings, plan.config.top)
        staged.findings.write_text(json.dumps(findings, indent=1))
        staged.report.write_text(markdown(findings, sheets))
        result = QualityResult(
            key=plan.key, folder=plan.files.folder, cache_hit=False, seconds=0.0,
            duplicates={name: len(pairs) for name, pairs in findings["duplicates"].items()},
            pixel_duplicates={name: len(pairs) for name, pairs in findings.get("pixel_duplicates", {}).items()},
            exact_duplicates=sum(p["exact"] for pairs in findings["duplicates"].values() for p in pairs),
            label_issues={s: len(v["flagged"]) for s, v in findings["label_issues"].items()},
            outliers={s: len(v) for s, v in findings["outliers"].items()}, leaked_test=len(leaked))
        staged.write_spec(plan.spec)
        staged.write_result(result.model_dump_json(exclude={"cache_hit", "seconds", "work_fields"}))
    log.info("quality of %s: %s", plan.experiment, summary(result))
    return result.model_copy(update={"seconds": time.perf_counter() - started})


def summary(result: QualityResult) -> str:
    pairs = ", ".join(f"{n} {name}" for name, n in result.duplicates.items())
    issues = ", ".join(f"{n} {s}" for s, n in result.label_issues.items())
    return (f"near-duplicate pairs: {pairs} ({result.exact_duplicates} byte-identical; {result.leaked_test} test "
            f"image(s) leaked); label-issue candidates: {issues}; outliers listed: "
            f"{sum(result.outliers.values())}")


def _finder(plan: QualityPlan, rows: dict[str, Rows], budget: float) -> Exact | Projected:
    """The exact searches, or the projected ones for ``search: approximate`` (``auto``: a split above
    :data:`EXACT_ROWS` rows)."""
    cfg = plan.config
    approximate = cfg.search == "approximate" or (cfg.search == "auto" and max(r.n for r in rows.values()) > EXACT_ROWS)
    if approximate:
        log.info("quality of %s: approximate searches (%d principal components, FAISS inverted lists)",
                 plan.experiment, cfg.dims)
        return Projected(rows, cfg.dims, cfg.neighbours, cfg.seed)
    return Exact(rows, cfg.neighbours, budget)


def _duplicates(plan: QualityPlan, manifest: Manifest, finder: Exact | Projected, ids: dict[str, list[str]],
                identical: dict[str, list[tuple[str, str]]]) -> dict[str, list[dict[str, Any]]]:
    """Pairs at or above the threshold: within each split (``train``), and from each later split into each
    earlier one (``train-test``: ``a`` in train, ``b`` in test); and every pair of bit-identical feature rows
    (``identical``), whatever the search made of them."""
    digest = functools.cache(lambda item: _digest(manifest, item))  # a file in several pairs is hashed once
    out = {}
    for name, later, earlier in _split_pairs(list(finder.rows)):
        pairs, seen = [], set()
        for q, g, cosine in finder.pairs(later, earlier, plan.config.duplicate_cosine):
            a, b = _pair_ids(ids, later, earlier, q, g)
            exact = bool(cosine >= EXACT_COSINE) and digest(a) is not None and digest(a) == digest(b)
            pairs.append({"a": a, "b": b, "cosine": round(float(cosine), 6), "exact": exact})
            seen.add((a, b))
        for a, b in identical.get(name, []):
            if (a, b) not in seen and (b, a) not in seen:
                pairs.append({"a": a, "b": b, "cosine": 1.0, "exact": digest(a) is not None and digest(a) == digest(b)})
        out[name] = pairs
    return out


def _identical_rows(stored: dict[str, Any], ids: dict[str, list[str]]) -> dict[str, list[tuple[str, str]]]:
    """Pairs of images whose stored features are bit-identical, by split pair as :func:`_duplicates` names them:
    a byte-identical copy always is one (a feature depends on its image alone), even where the centred cosine
    is undefined (every image the same: each centred row is zero). Each group of equal rows is a star on its
    first member (in train, val, test order), so n copies give n - 1 pairs."""
    first: dict[bytes, tuple[str, int]] = {}
    out: dict[str, list[tuple[str, str]]] = {}
    for split, rows in stored.items():
        for start, block in rows.chunks(IDENTICAL_CHUNK, verify=False):
            for i, row in enumerate(np.ascontiguousarray(block)):
                seen = first.setdefault(hashlib.blake2b(row.tobytes(), digest_size=16).digest(), (split, start + i))
                if seen != (split, start + i):
                    name = split if seen[0] == split else f"{seen[0]}-{split}"
                    out.setdefault(name, []).append((ids[seen[0]][seen[1]], ids[split][start + i]))
    return out


IDENTICAL_CHUNK = 16384


def _split_pairs(names: list[str]):
    """``(name, later, earlier)`` of every split pair searched: within each split (``train``), and each later
    split into each earlier one (``train-test``)."""
    for i, later in enumerate(names):
        for earlier in names[: i + 1]:
            yield (later if later == earlier else f"{earlier}-{later}"), later, earlier


def _pair_ids(ids: dict[str, list[str]], later: str, earlier: str, q: float, g: float) -> tuple[str, str]:
    """A found pair's ids: query row ``q`` of ``later``, gallery row ``g`` of ``earlier``; ``a`` the earlier
    split's (within one split: the lower row)."""
    if later == earlier:
        return ids[later][int(q)], ids[later][int(g)]
    return ids[earlier][int(g)], ids[later][int(q)]


def _pixel_duplicates(manifest: Manifest, rows: dict[str, Rows], ids: dict[str, list[str]]) -> dict[str, Any]:
    """``pixel_duplicates``: pairs whose pixel hashes differ in at most pixels.MAX_BITS bits, for the same split
    pairs as :func:`_duplicates` (one decode pass over every image); none, and ``pixel_left_out`` saying why,
    above pixels.PIXEL_ROWS images a split."""
    big = [s for s, r in rows.items() if r.n > pixels.PIXEL_ROWS]
    if big:
        return {"pixel_duplicates": {}, "pixel_left_out": f"splits {big} exceed {pixels.PIXEL_ROWS:,} images "
                                                          "(an all-pairs hash comparison)"}
    hashed = {s: pixels.hashes(manifest.image, ids[s]) for s in rows}
    out = {}
    for name, later, earlier in _split_pairs(list(rows)):
        (hq, bad_q), (hg, bad_g) = hashed[later], hashed[earlier]
        found = pixels.close_pairs(hq, None if later == earlier else hg, pixels.MAX_BITS, skip=(bad_q, bad_g))
        out[name] = [dict(zip("ab", _pair_ids(ids, later, earlier, q, g)), bits=int(d)) for q, g, d in found]
    return {"pixel_duplicates": out}


def _digest(manifest: Manifest, item: str) -> str | None:
    """sha256 of an item's encoded bytes, as its source opens them (None when it can no longer be opened:
    the pair is then not marked byte-identical)."""
    try:
        with data_source(manifest.source).open(manifest.root, item, manifest.options) as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except (OSError, ValueError) as exc:  # ValueError: a source's DataError (a shard or table changed)
        log.warning("quality: cannot read %s to compare its bytes (%s)", item, exc)
        return None


def _held(store: FeatureStore, plan: QualityPlan, split: str, r: Rows, budget: float) -> np.ndarray | None:
    """A split's features in memory as float32, or None above the memory budget."""
    if r.n * r.dim * 4 > budget:
        return None
    return store.read(plan.features[split], [plan.config.layer]).features[plan.config.layer].astype(np.float32)


def _label_issues(plan: QualityPlan, X: np.ndarray | None, manifest: Manifest, finder: Exact | Projected,
                  ids: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Train: the probe and the kNN vote averaged (the vote alone when the training features exceed the memory
    budget), then :func:`label_issues.low_self_confidence`; val/test: the vote of the nearest training images."""
    cfg, n_classes, out, rows = plan.config, len(manifest.classes), {}, finder.rows
    train = rows["train"]
    near = cl.VoteProbabilities(finder.neighbour_labels("train", "train"), train.labels, n_classes)
    vote = f"the {cfg.neighbours} nearest other training images' vote"
    how = "; the rows Confident Learning counts, lowest self-confidence first"
    if X is None:
        why = "approximate search" if finder.method == "approximate" else "features exceed the memory budget"
        out["train"] = _flags(train.labels, near, ids["train"], f"{vote} (no probe: {train.n} x {train.dim} {why}){how}")
    else:
        probe, votes = cl.out_of_fold(X, train.labels, n_classes, cfg.folds, cfg.seed), near.rows(slice(None))
        alone = np.isnan(probe).any(axis=1)
        method = f"the mean of out-of-fold logistic probabilities ({cfg.folds} folds) and {vote}{how}"
        if alone.any():
            few = [manifest.classes[c] for c in np.flatnonzero(np.bincount(train.labels, minlength=n_classes) < 2)]
            method += (f"; {int(alone.sum())} image(s) by the vote alone: their fold's probe saw one class "
                       f"(classes with under 2 training images: {few})")
            log.info("quality of %s: %s", plan.experiment, method.split("; ")[-1])
        out["train"] = _flags(train.labels, np.where(alone[:, None], votes, (np.nan_to_num(probe) + votes) / 2),
                              ids["train"], method)
    for split in (s for s in rows if s != "train"):
        votes = finder.neighbour_labels(split, "train")
        against, majority = cl.vote_disagreement(votes, rows[split].labels, n_classes)
        flagged = np.flatnonzero((majority != rows[split].labels) & (against > 0.5))
        flagged = flagged[np.argsort(-against[flagged], kind="stable")]
        out[split] = {"method": f"the {votes.shape[1]} nearest training images vote", "flagged": [
            {"id": ids[split][i], "given": int(rows[split].labels[i]), "predicted": int(majority[i]),
             "against": round(float(against[i]), 6)} for i in flagged]}
    return out


def _flags(labels: np.ndarray, proba: Any, ids: list[str], method: str) -> dict[str, Any]:
    confidence, flagged = cl.self_confidence(labels, proba), cl.low_self_confidence(labels, proba)
    guesses = cl.predicted(proba, flagged)
    return {"method": method, "flagged": [
        {"id": ids[i], "given": int(labels[i]), "predicted": int(guess),
         "self_confidence": round(float(confidence[i]), 6)} for i, guess in zip(flagged, guesses)]}


def _outliers(plan: QualityPlan, store: FeatureStore, train: np.ndarray | None, finder: Exact | Projected,
              ids: dict[str, list[str]], budget: float) -> dict[str, list[dict[str, Any]]]:
    cfg, out = plan.config, {}
    for split, r in finder.rows.items():
        overall = 1.0 - finder.kth_similarity(split)
        held = finder.method == "exact" and split != "train"
        X = _held(store, plan, split, r, budget) if held else train
        in_class = None if X is None else 1.0 - kth_similarity_in_class(X, r.labels, cfg.neighbours)
        top = np.argsort(-overall, kind="stable")[: cfg.top]
        out[split] = [{"id": ids[split][i], "label": int(r.labels[i]), "distance": round(float(overall[i]), 6),
                       **({"distance_in_class": round(float(in_class[i]), 6)} if in_class is not None else {})}
                      for i in top]
    return out


def _sheets(files: Any, manifest: Manifest, findings: dict[str, Any], top: int) -> dict[str, str]:
    classes, drawn = findings["classes"], {}
    pairs = sorted(((name, p) for name, ps in findings["duplicates"].items() for p in ps),
                   key=lambda np_: ("-" not in np_[0], -np_[1]["cosine"]))[:top]
    if pairs:
        drawn["duplicates"] = draw(files.sheet("duplicates"), manifest,
                                   [([p["a"], p["b"]], f"{name} {p['cosine']:.3f}") for name, p in pairs],
                                   "near-duplicate pairs (cross-split first)", columns=3).name
    issues = [(s, f) for s, v in findings["label_issues"].items() for f in v["flagged"][:top]][:top]
    if issues:
        drawn["label_issues"] = draw(files.sheet("label_issues"), manifest,
                                     [([f["id"]], f"{s}: {classes[f['given']]} -> {classes[f['predicted']]}")
                                      for s, f in issues], "label-issue candidates (given -> predicted)").name
    far = [(s, o) for s, os_ in findings["outliers"].items() for o in os_[: max(1, top // len(findings["outliers"]))]]
    if far:
        drawn["outliers"] = draw(files.sheet("outliers"), manifest,
                                 [([o["id"]], f"{s} {classes[o['label']]} {o['distance']:.3f}") for s, o in far],
                                 "outliers (cosine distance to the k-th neighbour)").name
    return drawn


def markdown(findings: dict[str, Any], sheets: dict[str, str]) -> str:
    classes = findings["classes"]
    lines = ["# Data quality", "", "## Near-duplicates and leaks", ""]
    for name, pairs in findings["duplicates"].items():
        exact = sum(p["exact"] for p in pairs)
        lines.append(f"- {name}: {len(pairs)} pair(s), {exact} byte-identical")
    lines += [f"- test images with a near-duplicate in train or val: {len(findings['leaked_test'])}", ""]
    for name, pairs in ((n, p) for n, p in findings["duplicates"].items() if p):
        lines += [f"| {name} | a | b | cosine |", "|---|---|---|---|"] + [
            f"| {'exact' if p['exact'] else ''} | {p['a']} | {p['b']} | {p['cosine']:.4f} |" for p in pairs[:20]] + [""]
    if "duplicates" in sheets:
        lines += [f"![near-duplicates]({sheets['duplicates']})", ""]
    if "pixel_duplicates" in findings:
        by_pixels = findings.get("pixel_left_out") or ", ".join(
            f"{name} {len(pairs)}" for name, pairs in findings["pixel_duplicates"].items())
        lines += [f"By pixels (perceptual hashes within {pixels.MAX_BITS} bits): {by_pixels}", ""]
    lines += ["## Label issues", ""]
    for split, found in findings["label_issues"].items():
        lines.append(f"- {split}: {len(found['flagged'])} candidate(s) ({found.get('method') or found.get('left_out')})")
        lines += [f"  - {f['id']}: given {classes[f['given']]}, predicted {classes[f['predicted']]}"
                  for f in found["flagged"][:20]]
    if "label_issues" in sheets:
        lines += ["", f"![label issues]({sheets['label_issues']})"]
    lines += ["", "## Outliers (cosine distance to the k-th neighbour)", ""]
    for split, found in findings["outliers"].items():
        lines += [f"- {split}: " + ", ".join(f"{o['id']} ({o['distance']:.3f})" for o in found[:10])]
    if "outliers" in sheets:
        lines += ["", f"![outliers]({sheets['outliers']})"]
    return "\n".join(lines) + "\n"
