"""Helpers the tests share (fixtures live in conftest.py): synthetic images, configs on disk, corruption."""
from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from storage.features import FeatureStore
from storage.keys import feature_key, feature_spec

COLORS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 30)]


def make_image(path: Path, label: int, index: int, size: int = 20, mode: str = "RGB") -> Path:
    """A small image whose colour says its class and whose noise makes it unique."""
    rng = np.random.default_rng(1000 * label + index)
    base = np.array(COLORS[label % len(COLORS)], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def make_imagefolder(root: Path, n_per_class: int = 6, classes: int = 3, splits: tuple[str, ...] = ()) -> Path:
    """``root/<class>/<i>.png`` or, with ``splits``, ``root/<split>/<class>/<i>.png``."""
    for s, split in enumerate(splits or ("",)):
        for c in range(classes):
            for i in range(n_per_class):
                make_image(root / split / f"class{c}" / f"{i:03d}.png", c, 100 * s + i)
    return root


def make_shards(folder: Path, out: Path, per_shard: int = 7, label: str = "cls", name: str = "shard") -> list[Path]:
    """An image folder (``<class>/<image>``) as WebDataset tar shards: sample ``<class>_<stem>`` holds the
    image's bytes and its class name (``.cls``, or ``.json`` with a ``label`` field)."""
    import io
    import json
    import tarfile

    images = sorted(p for p in folder.rglob("*") if p.is_file())
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(images), per_shard)):
        shards.append(out / f"{name}-{n:03d}.tar")
        with tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for image in images[start : start + per_shard]:
                key = f"{image.parent.name}_{image.stem}"
                text = json.dumps({"label": image.parent.name}) if label == "json" else image.parent.name
                for member, data in ((f"{key}{image.suffix}", image.read_bytes()),
                                     (f"{key}.{label}", text.encode())):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return shards


def make_table(folder: Path, path: Path, holds: str = "struct", split: bool = False, class_label: bool = False,
               row_group: int = 5) -> Path:
    """An image folder (``<class>/<image>``) as a table, one row per image: ``image`` as the Hugging Face struct
    ``{bytes, path}`` (``struct``), the struct with null bytes and a path relative to the table (``struct-paths``: what
    ``Dataset.cast_column("image", Image())`` on file paths writes), raw ``bytes``, or a ``path`` relative to
    ``folder``; ``label`` the class name
    (or with ``class_label`` its index and a Hugging Face ``ClassLabel`` in the schema); ``split`` optional."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    images = sorted(p for p in folder.rglob("*") if p.is_file())
    names = sorted({p.parent.name for p in images})
    rel = [p.relative_to(folder).as_posix() for p in images]
    import os

    by_path = [{"bytes": None, "path": os.path.relpath(p, path.parent)} for p in images]  # as datasets writes files
    columns = {"image": {"struct": [{"bytes": p.read_bytes(), "path": r} for p, r in zip(images, rel)],
                         "struct-paths": by_path,
                         "bytes": [p.read_bytes() for p in images], "path": rel}[holds],
               "label": [names.index(p.parent.name) if class_label else p.parent.name for p in images]}
    if split:
        columns["split"] = ["validation" if i % 5 == 1 else "test" if i % 5 == 2 else "train" for i in range(len(images))]
    table = pa.table(columns)
    if class_label:
        meta = {"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=row_group)
    elif path.suffix == ".csv":
        pc.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return path


def write_config(cfg, path: Path) -> Path:
    """An ExperimentConfig as the YAML file a user would write."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def split_plans(cfg) -> dict:
    """The extraction plan of every split of an experiment config."""
    from tasks.extract.plan import plan_extraction

    return plan_extraction(cfg.data, cfg.backbone, cfg.extract, cfg.cache_dir)


def flip_a_feature_byte(path: Path) -> None:
    """Silent corruption: one bit of the first feature chunk of a complete file (of its first piece, when it is
    joined from pieces)."""
    with h5py.File(path) as fh:
        ds = fh["features/penultimate"]
        if ds.is_virtual:
            path = path.parent / ds.virtual_sources()[0].file_name
            return flip_a_feature_byte(path)
        offset = ds.id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0x10]))


def task_runs(flow_state, wait_s: float = 300.0) -> dict[str, object]:
    """The task runs of a flow run (by name), read from the Prefect API once every one has reached a final state.

    Prefect 3 records task run states from events, after the flow has returned: read at once under load, the
    API could still show a failed task as running (or not yet list it)."""
    import time

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if (runs and all(run.state is not None and run.state.is_final() for run in runs)) \
                    or time.monotonic() > deadline:
                return {run.name: run for run in runs}
            time.sleep(0.2)


def state_of(path: Path) -> dict:
    """A checkpoint's model weights (read safely: tensors only)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


#: a child process that runs one fine-tune plan (argv[1]: its JSON), to be killed mid-run
FINETUNE_CHILD = """
import sys
from tasks.finetune.plan import FinetunePlan
from tasks.finetune.stage import finetune
finetune(FinetunePlan.model_validate_json(open(sys.argv[1]).read()))
"""


# --------------------------------------------------------------------------- synthetic feature files

CLASSES = 5
DIM = 24


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian classes (a probe cannot be perfect), float16 as feature files store them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(0, 1.0, (CLASSES, DIM))
    y = rng.integers(0, CLASSES, n)
    X = centres[y] + rng.normal(0, 1.2, (n, DIM)) + 3.0  # an offset: standardisation has work to do
    return X.astype(np.float16), y


def synthetic_spec(name: str, n: int, seed: int) -> dict:
    return feature_spec(backbone="synthetic", weights=f"blobs(n={n},seed={seed})", layers=["penultimate"],
                        pooling="avg", preprocess={}, dataset=name, split=name, dtype="float16", precision="fp32")


def store_split(cache: Path, name: str, n: int, seed: int, block: int = 500) -> str:
    X, y = blobs(n, seed)
    spec = synthetic_spec(name, n, seed)
    key = feature_key(spec)
    FeatureStore(cache).write(key, ({"penultimate": X[i : i + block]} for i in range(0, n, block)), y,
                              classes=[f"c{i}" for i in range(CLASSES)], dims={"penultimate": DIM}, spec=spec)
    return key


# against a real Prefect server (test_serve, test_watch)
def wait(what: str, check, timeout: float, logs: list[Path] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {p}:\n{p.read_text()[-4000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{tails}")


def flow_run(server, run_id: str) -> dict:
    return server.api("GET", f"/flow_runs/{run_id}")


def deployment_runs(server, deployment_id: str, auto_scheduled: bool) -> list[dict]:
    runs = server.api("POST", "/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    return [r for r in runs if r["auto_scheduled"] == auto_scheduled]


def served_deployment(server, name: str, logs: list[Path] = ()) -> dict:
    """The deployment ``pipeline-from-config/<name>`` once ``serve`` has registered it."""
    def found():
        try:
            return server.api("GET", f"/deployments/name/pipeline-from-config/{name}")
        except Exception:  # noqa: BLE001 - not registered yet
            return None

    return wait("the deployment to be registered", found, 1800, logs)


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def final_state(server, run_id: str, what: str, logs: list[Path] = ()) -> dict:
    """A flow run's state once it is final."""
    def done():
        state = flow_run(server, run_id)["state"]
        return state if state["type"] in FINAL else None

    return wait(what, done, 1800, logs)


def interrupt(proc, timeout: float = 1800) -> None:
    """Ctrl-C a process started in its own session (``serve``, ``watch``); SIGKILL if it outlives ``timeout``."""
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
