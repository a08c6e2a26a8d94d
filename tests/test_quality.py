"""The quality stage: its streamed searches equal brute force, its Confident Learning flags the rows cleanlab
flags on the same probabilities, and a planted leak, label flip and outlier are found in a real run."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from helpers import make_imagefolder

from tasks.index.retrieval import Rows
from tasks.quality import label_issues as cl
from tasks.quality.search import centred, kth_similarity, kth_similarity_in_class, near_pairs, neighbour_labels


def clustered(n: int = 300, dim: int = 16, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim)) * 3
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.standard_normal((n, dim))).astype(np.float32), y


def brute(a: np.ndarray, b: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Cosine after subtracting ``centre``'s mean, computed directly."""
    mean = centre.astype(np.float64).mean(axis=0)
    a, b = a - mean, b - mean
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def test_near_pairs_streamed_equal_brute_force_within_and_across_splits():
    X, y = clustered()
    Q = np.concatenate([X[:5] + 1e-3, clustered(40, seed=1)[0]])  # five planted near-copies of train rows
    for memory in (0.0, float("inf")):  # streamed from chunks, and held in memory
        train, test = Rows.of(X, y, chunk=37), Rows.of(Q, np.zeros(len(Q), int), chunk=11)
        across = near_pairs(test, train, 5, 0.99, memory, centred(train))
        sims = brute(Q, X, X)
        expect = {(q, g) for q, g in zip(*np.nonzero(sims >= 0.99))}
        assert {(int(q), int(g)) for q, g, _ in across} == expect and {(i, i) for i in range(5)} <= expect
        X2 = np.concatenate([X, X[:3]])  # three exact repeats within one split
        within = near_pairs(Rows.of(X2, np.zeros(len(X2), int), chunk=50), None, 5, 0.999, memory)
        assert sorted((int(a), int(b)) for a, b, _ in within) == [(0, 300), (1, 301), (2, 302)]


def _splits(dim: int = 16):
    """Train, and a test split holding five near-copies of train rows, as Rows."""
    X, y = clustered(600, dim)
    Q = np.concatenate([X[:5] + 1e-3, clustered(200, dim, seed=1)[0]])
    return {"train": Rows.of(X, y, chunk=64), "test": Rows.of(Q, np.zeros(len(Q), int), chunk=50)}, X, Q


def test_projected_search_on_every_component_equals_the_exact_one():
    pytest.importorskip("faiss")
    from tasks.quality.approximate import Projected
    from tasks.quality.search import Exact

    rows, X, Q = _splits()
    exact, projected = Exact(rows, 5, 0.0), Projected(rows, dims=16, k=5, seed=0)  # 16 of 16: a rotation
    for query, gallery in (("test", "train"), ("train", "train"), ("test", "test")):
        a, b = ({(int(q), int(g)): c for q, g, c in f.pairs(query, gallery, 0.95)} for f in (exact, projected))
        assert a.keys() == b.keys() and all(abs(a[p] - b[p]) < 1e-5 for p in a)  # order may differ at ties
        same = exact.neighbour_labels(query, gallery) == projected.neighbour_labels(query, gallery)
        assert same.mean() > 0.99
    assert {(i, i) for i in range(5)} <= {(int(q), int(g)) for q, g, _ in exact.pairs("test", "train", 0.95)}
    centre = brute(X, X, X)
    np.fill_diagonal(centre, -np.inf)
    assert np.allclose(projected.kth_similarity("train"), np.sort(centre, axis=1)[:, -5], atol=1e-5)


def test_projected_search_with_an_inverted_index_finds_the_planted_copies(monkeypatch):
    pytest.importorskip("faiss")
    from tasks.quality import approximate

    monkeypatch.setattr(approximate, "FLAT_ROWS", 100)  # these few rows get an inverted-file index too
    rows, X, Q = _splits(dim=64)
    found = approximate.Projected(rows, dims=8, k=5, seed=0)
    pairs = found.pairs("test", "train", 0.99)
    assert {(i, i) for i in range(5)} <= {(int(q), int(g)) for q, g, _ in pairs}
    assert np.allclose(pairs[:, 2], [brute(Q[[int(q)]], X[[int(g)]], X)[0, 0] for q, g, _ in pairs], atol=1e-5)
    votes = found.neighbour_labels("train", "train")
    assert votes.shape == (600, 5) and (votes >= -1).all() and (found.kth_similarity("train") <= 1.0001).all()


def test_kth_neighbour_similarity_equals_brute_force_overall_and_in_class():
    X, y = clustered(120)
    sims = brute(X, X, X)
    np.fill_diagonal(sims, -np.inf)
    expect = np.sort(sims, axis=1)[:, -4]
    assert np.allclose(kth_similarity(Rows.of(X, y, chunk=16), 4, 0.0), expect, atol=1e-5)
    in_class = kth_similarity_in_class(X, y, 4)
    for c in range(4):
        members = np.flatnonzero(y == c)
        sub = brute(X[members], X[members], X[members])
        np.fill_diagonal(sub, -np.inf)
        assert np.allclose(in_class[members], np.sort(sub, axis=1)[:, -4], atol=1e-5)


def test_neighbour_votes_say_who_disagrees_with_its_label():
    X, y = clustered(200)
    given = y[:20].copy()
    given[:3] = (given[:3] + 1) % 4  # three wrong labels
    votes = neighbour_labels(Rows.of(X[:20] + 1e-3, given), Rows.of(X[20:], y[20:]), 7, 0.0)
    against, majority = cl.vote_disagreement(votes, given, 4)
    assert set(np.flatnonzero((majority != given) & (against > 0.5))) == {0, 1, 2}


@pytest.mark.parametrize("seed", range(6))
def test_confident_learning_flags_the_rows_cleanlab_flags(seed, monkeypatch):
    find_label_issues = pytest.importorskip("cleanlab.filter").find_label_issues
    monkeypatch.setattr(cl, "BLOCK", 64)  # the rows are read in several blocks
    rng = np.random.default_rng(seed)
    n, k = 400, 3 + seed
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k)) + 3.0 * np.eye(k)[y]
    flipped = rng.choice(n, 40, replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, k, 40)) % k  # noisy labels
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    theirs = find_label_issues(y, proba, filter_by="confident_learning")
    ours = cl.confident_learning(y, proba)
    assert ours.sum() > 10 and np.array_equal(ours, theirs)
    ranked = find_label_issues(y, proba, filter_by="low_self_confidence", return_indices_ranked_by="self_confidence")
    assert np.array_equal(cl.low_self_confidence(y, proba), ranked)  # the same rows, in the same order


def test_vote_probabilities_are_smoothed_votes_that_sum_to_one():
    votes = np.array([[0, 0, 1], [2, 2, 2]])
    proba = cl.VoteProbabilities(votes, np.array([0, 1, 2, 2]), 3, prior_weight=1.0).rows(slice(None))
    assert np.allclose(proba.sum(axis=1), 1) and (proba > 0).all()
    assert np.allclose(proba[0], [(2 + 0.25) / 4, (1 + 0.25) / 4, (0 + 0.5) / 4])


def test_vote_probabilities_flag_what_their_dense_matrix_flags(monkeypatch):
    monkeypatch.setattr(cl, "BLOCK", 50)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 400)
    neighbours = np.where(rng.random((400, 7)) < 0.7, labels[:, None], rng.integers(0, 6, (400, 7)))
    neighbours[:40] = (labels[:40, None] + 1) % 6  # forty rows whose neighbours all say another class
    neighbours[5, 3:] = -1  # an index that found fewer neighbours
    votes = cl.VoteProbabilities(neighbours, labels, 6)
    dense = votes.rows(slice(None))  # the whole matrix at once
    assert np.allclose(cl.self_confidence(labels, votes), cl.self_confidence(labels, dense))
    assert np.array_equal(cl.confident_learning(labels, votes), cl.confident_learning(labels, dense))
    flagged = cl.low_self_confidence(labels, votes)
    assert np.array_equal(flagged, cl.low_self_confidence(labels, dense)) and set(range(40)) <= set(flagged)


def test_out_of_fold_probabilities_never_see_their_row():
    X, y = clustered(90)
    y[:5] = (y[:5] + 1) % 4  # a model that saw them would fit their flipped labels
    proba = cl.out_of_fold(X, y, 4, folds=3, seed=0)
    assert np.allclose(proba.sum(axis=1), 1) and (cl.self_confidence(y, proba)[:5] < 0.5).all()


@pytest.mark.slow
@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_a_planted_leak_label_flip_and_outlier_are_found_and_drawn(tiny_config, tmp_path, search):
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow

    root = make_imagefolder(tmp_path / "planted", n_per_class=8, splits=("train", "test"))
    shutil.copy2(root / "train/class0/003.png", root / "test/class0/leak.png")  # byte-identical
    shutil.move(root / "train/class1/005.png", root / "train/class2/flipped.png")
    from PIL import Image

    pixels = np.asarray(Image.open(root / "train/class1/004.png").convert("RGB"), dtype=np.int16)
    noisy = np.clip(pixels + np.random.default_rng(0).integers(-1, 2, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(root / "test/class1/noisy.png")  # re-encoded with faint noise
    cfg = tiny_config(data={"root": str(root)}, quality={"neighbours": 3, "folds": 2, "top": 5, "search": search,
                                                          "dims": 8, "pixels": True}, heads=[{"kind": "knn", "k": [1]}])
    with local_run_settings():
        first = pipeline_flow(cfg, stop_after="quality").quality
        again = pipeline_flow(cfg, stop_after="quality").quality
        run = pipeline_flow(cfg)  # the evaluation scores the test split with and without its leaked images
        from prefect.artifacts import Artifact

        published = Artifact.get("tiny-quality")  # the report on the run's page, its contact sheets inline
        report = Artifact.get("tiny-report")  # every plot inline too: a relative link is a broken image in the UI
    assert report is not None and report.data.count("](data:image/png;base64,") >= 2
    assert not re.search(r"\]\([^)]*\.png\)", report.data), "a plot the UI cannot show"
    assert published is not None and "## Label issues" in published.data
    assert "data:image/png;base64," in published.data and "](duplicates.png)" not in published.data
    findings = json.loads((first.folder / "findings.json").read_text())
    assert findings["search"]["method"] == search
    by_pixels = {(p["a"], p["b"]) for p in findings["pixel_duplicates"]["train-test"]}
    assert ("train/class1/004.png", "test/class1/noisy.png") in by_pixels and "test/class1/noisy.png" in findings["leaked_test"]
    assert first.pixel_duplicates["train-test"] >= 2  # the noisy copy and the byte-identical one
    leak = {"a": "train/class0/003.png", "b": "test/class0/leak.png"}
    assert any(p["a"] == leak["a"] and p["b"] == leak["b"] and p["exact"] for p in findings["duplicates"]["train-test"])
    assert "test/class0/leak.png" in findings["leaked_test"] and first.leaked_test >= 1 and first.exact_duplicates >= 1
    assert len(findings["outliers"]["train"]) == 5 and findings["label_issues"]["train"]["method"]
    assert (first.folder / "duplicates.png").stat().st_size > 0 and (first.folder / "outliers.png").exists()
    assert "## Near-duplicates and leaks" in first.report.read_text()
    assert again.cache_hit and again.key == first.key and again.duplicates == first.duplicates
    metrics = run.models[0].metrics
    assert metrics["leaked_test_images"] == first.leaked_test and metrics["top1_without_leaks"] is not None
    assert run.quality.cache_hit and "top1 without leaks" in run.report.read_text()


def test_a_cleaned_few_shot_subset_differs_only_where_a_flagged_row_was_drawn():
    from tasks.heads.stage import few_shot_indices

    labels = np.repeat(np.arange(3), 20)
    plain = few_shot_indices(labels, 5, seed=1)
    excluded = np.zeros(len(labels), dtype=bool)
    excluded[plain[:2]] = True  # two drawn rows are flagged
    excluded[np.setdiff1d(np.arange(len(labels)), plain)[:4]] = True  # and four never drawn
    cleaned = few_shot_indices(labels, 5, seed=1, excluded=excluded)
    assert len(cleaned) == 15 and not excluded[cleaned].any()
    assert len(np.setdiff1d(plain, cleaned)) == 2  # only the flagged draws were replaced
    assert np.array_equal(few_shot_indices(labels, "all", 0, excluded), np.flatnonzero(~excluded))


@pytest.mark.slow
def test_quality_exclude_trains_cleaned_heads_and_reports_the_paired_gain(tiny_config, tmp_path):
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow
    from storage import results as registry

    root = make_imagefolder(tmp_path / "planted", n_per_class=8, splits=("train", "test"))
    for i in range(3):  # three flipped labels the probe should disagree with
        shutil.move(root / f"train/class1/00{i}.png", root / f"train/class2/flipped{i}.png")
    quality = {"neighbours": 3, "folds": 2, "top": 5}
    heads = [{"kind": "logistic", "name": "probe", "C": [1.0]}]
    plain_cfg = tiny_config(data={"root": str(root)}, quality=quality, heads=heads)
    cfg = tiny_config(data={"root": str(root)}, quality={**quality, "exclude": True}, heads=heads)
    with local_run_settings():
        plain = pipeline_flow(plain_cfg)
        run = pipeline_flow(cfg)
    assert run.quality.key == plain.quality.key and run.quality.cache_hit  # exclude is not in the findings' key
    names = {h.name: h for h in run.heads}
    assert set(names) == {"probe", "probe-cleaned"}
    assert names["probe"].key == plain.heads[0].key and names["probe"].cache_hit  # the plain head is reused
    flagged = run.quality.label_issues["train"]
    assert flagged >= 1 and names["probe-cleaned"].records[0].n_train == names["probe"].records[0].n_train - flagged
    cleaned = next(m for m in run.models if m.name == "probe-cleaned")
    assert cleaned.metrics["excluded_rows"] == flagged
    text = run.report.read_text()
    assert "## Cleaning" in text and "| probe-cleaned | all |" in text
    rows = {r["model"]: r for r in registry.query(cfg.cache_dir) if r["run_key"] == run.evaluation.key}
    assert rows["probe-cleaned"]["cleaning_gain_lo"] <= rows["probe-cleaned"]["cleaning_gain"] <= rows["probe-cleaned"]["cleaning_gain_hi"]
    assert rows["probe"]["label_issues"] == flagged and rows["probe"]["quality_key"] == run.quality.key
    assert rows["probe"]["cleaning_gain"] is None and rows["probe-cleaned"]["excluded_rows"] == flagged


def test_contact_sheets_are_inlined_in_the_artifact_up_to_a_size(tmp_path):
    from flows.execution import publish

    (tmp_path / "small.png").write_bytes(b"\x89PNG small")
    (tmp_path / "big.png").write_bytes(b"0" * (publish.INLINE_BYTES + 1))
    text = publish.with_pictures_inline("![a](small.png) ![b](big.png) ![c](gone.png) ![d](../up.png)", tmp_path)
    assert text.startswith("![a](data:image/png;base64,")
    assert f"*(b: 1.0 MiB, too big to show here: {tmp_path / 'big.png'})*" in text  # named, not a broken image
    assert f"*(c: {tmp_path / 'gone.png'} is gone)*" in text and "![d](../up.png)" in text


def test_pixel_hashes_find_a_faint_copy_and_not_a_different_image():
    from PIL import Image

    from tasks.quality import pixels

    rng = np.random.default_rng(0)
    base = (rng.random((32, 32)) * 255).astype(np.uint8)
    noisy = np.clip(base.astype(np.int16) + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)
    other = (rng.random((32, 32)) * 255).astype(np.uint8)
    images = {"a": Image.fromarray(base), "b": Image.fromarray(noisy), "c": Image.fromarray(other)}
    hashed, unreadable = pixels.hashes(lambda item: images[item] if item != "gone" else open("/nonexistent"),
                                       ["a", "b", "c", "gone"])
    assert list(unreadable) == [False, False, False, True]
    pairs = pixels.close_pairs(hashed, None, skip=(unreadable, unreadable))
    assert [(int(a), int(b)) for a, b, _ in pairs] == [(0, 1)]  # the copy, not the other image or the unreadable
    across = pixels.close_pairs(hashed[1:2], hashed, skip=(unreadable[1:2], unreadable))
    assert {(int(a), int(b)) for a, b, _ in across} == {(0, 0), (0, 1)}  # its original and itself
    assert list(across[:, 2]) == sorted(across[:, 2])  # closest first


@pytest.mark.slow
def test_byte_identical_images_are_found_even_when_every_image_is_the_same(tiny_config, tmp_path):
    """Issue 43: 200 byte-identical images reported 0 duplicates (every centred row is zero, so the centred
    cosine is undefined); bit-identical feature rows are found whatever the search makes of them."""
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow

    root = make_imagefolder(tmp_path / "same", n_per_class=6, splits=("train", "test"))
    one = (root / "train/class0/000.png").read_bytes()
    for png in root.rglob("*.png"):
        png.write_bytes(one)
    cfg = tiny_config(data={"root": str(root)}, quality={"neighbours": 3, "folds": 2, "top": 5},
                      heads=[{"kind": "knn", "k": [1]}])
    with local_run_settings():
        found = pipeline_flow(cfg, stop_after="quality").quality
    findings = json.loads((found.folder / "findings.json").read_text())
    assert found.leaked_test == 18 == len(findings["leaked_test"])  # every test image is a copy of a train image
    assert len(findings["duplicates"]["train"]) == 17 and all(p["exact"] for p in findings["duplicates"]["train"])
    assert found.exact_duplicates == sum(len(p) for p in findings["duplicates"].values())  # all byte-identical
    assert set(findings["duplicates"]) >= {"train", "train-test"} and not findings["duplicates"].get("test")


@pytest.mark.slow
def test_a_class_with_one_training_image_is_voted_on_and_never_excluded_away(tiny_config, tmp_path):
    """Issue 43: a class with one training image failed the out-of-fold probe with scikit-learn's message, and
    quality.exclude could take a class's last rows away (the run then died at the evaluation)."""
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow
    from tasks.heads.stage import _keeping_every_class

    root = make_imagefolder(tmp_path / "two", n_per_class=8, classes=2, splits=("train", "test"))
    (root / "train/class1").rename(root / "train/keep")
    for png in sorted((root / "train/keep").glob("*.png"))[1:]:
        png.unlink()  # class "keep": one training image
    (root / "test/class1").rename(root / "test/keep")
    cfg = tiny_config(data={"root": str(root)}, quality={"neighbours": 3, "folds": 2, "top": 5, "exclude": True},
                      heads=[{"kind": "logistic", "C": [1.0]}])
    with local_run_settings():
        run = pipeline_flow(cfg)
    method = json.loads((run.quality.folder / "findings.json").read_text())["label_issues"]["train"]["method"]
    assert "by the vote alone: their fold's probe saw one class (classes with under 2 training images: ['keep'])" in method
    assert {m.name for m in run.models} >= {"logistic", "logistic-cleaned"}

    class Rows:  # the rule itself: a class whose every row is flagged keeps them all
        labels, classes = np.array([0, 0, 1, 1, 2]), ["a", "b", "c"]

    kept = _keeping_every_class(np.array([True, False, True, True, True]), Rows(), "probe-cleaned")
    assert kept.tolist() == [True, False, False, False, False]


def test_the_server_takes_the_event_of_a_report_with_its_pictures_inline():
    """A report artifact with a few pictures inline (each up to INLINE_BYTES) is one server event: Prefect's
    1.5 MB default refused the demo's (2.97 MB) with a WARNING; a process that imports transferpipe raises it."""
    import subprocess
    import sys

    from flows.execution import publish

    code = ("import flows; from prefect.settings import get_current_settings; "
            "print(get_current_settings().server.events.maximum_size_bytes)")
    env = {"PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 8 * publish.INLINE_BYTES * 4 // 3  # eight pictures, base64
