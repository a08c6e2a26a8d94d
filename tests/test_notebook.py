"""The notebook API (flows/notebook.py): cached features as arrays, chunks and a torch Dataset, nothing computed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.notebook import NotCached, cached_features
from helpers import split_plans
from storage.features import FeatureStore
from tasks.extract.stage import extract_split

REPO = Path(__file__).resolve().parent.parent


def yaml_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", include={"name", "data", "backbone", "extract"})))
    return path


def test_a_cached_split_as_arrays_chunks_and_a_dataset(tiny_config):
    cfg = tiny_config()
    stored = extract_split(split_plans(cfg)["train"])
    split = cached_features(cfg, "train")
    want = FeatureStore(cfg.cache_dir).read(stored.key)
    assert split.key == stored.key and split.path == stored.path
    np.testing.assert_array_equal(split.X, want.features["penultimate"])
    np.testing.assert_array_equal(split.y, want.labels)
    assert split.ids == want.paths and split.classes == want.classes and split.X.dtype == np.float16
    np.testing.assert_array_equal(np.concatenate([b for _, b in split.chunks(rows=5)]), split.X)
    ds = split.dataset()
    x, label = ds[3]
    assert len(ds) == len(split.y) and x.dtype.is_floating_point and x.shape == (512,) and int(label) == split.y[3]


def test_a_split_not_in_the_cache_says_which_command_computes_it(tiny_config, tmp_path):
    cfg = tiny_config()
    path = yaml_config(cfg, tmp_path / "exp.yaml")
    with pytest.raises(NotCached, match=rf"the val split of 'tiny' is not in the cache .*: `transferpipe extract "
                                        rf"{path}` computes it"):
        cached_features(path, "val", cache_dir=cfg.cache_dir)
    with pytest.raises(NotCached, match="has no split 'holdout'; its splits: train, val, test"):
        cached_features(cfg, "holdout")


@pytest.mark.slow  # seconds of extraction or subprocesses: the full suite runs it
def test_reading_a_cache_imports_neither_torch_nor_prefect(tiny_config, tmp_path):
    cfg = tiny_config()
    extract_split(split_plans(cfg)["test"])  # this process has torch; the reader below must not need it
    path = yaml_config(cfg, tmp_path / "exp.yaml")
    code = ("import sys\nfrom flows.notebook import cached_features\n"
            f"s = cached_features({str(path)!r}, 'test', cache_dir={str(cfg.cache_dir)!r})\n"
            "print(s.X.shape, len(s.ids), s.classes)\n"
            "print('heavy:', ','.join(m for m in ('torch', 'torchvision', 'prefect') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].strip() == "heavy:", done.stdout
