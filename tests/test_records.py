"""A shared cache folder no one can turn against its users: Prefect's records are hints, checked before Prefect
reads them, and what a run reports for a cached stage comes from the store (docs/cache.md#what-a-shared-cache-trusts).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

from flows.execution.trusted_records import problem
from tasks.extract.plan import ExtractResult

KEY = "extract-split-" + "a" * 64 + "-" + "b" * 16

#: a module that leaves a file when imported: what a hostile record would make Prefect import
MARKER_MODULE = """
from pathlib import Path
Path(__file__).with_name("imported-" + __name__).write_text("imported")
class Thing:
    pass
"""


class LeavesAMarker:
    """Unpickling this runs ``Path.touch`` on the marker: what a pickle record would make Prefect run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Warned(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def own_record(name: str = KEY, result=None) -> bytes:
    """A record exactly as a stage task writes it (``result_serializer="json"``)."""
    result = result or ExtractResult(key="a" * 64, split="train", path=Path("/c/f.h5"), manifest=Path("/c/m.json"),
                                     rows=3, dims={"penultimate": 8}, skipped=0, forward_batches=1,
                                     cache_hit=False, seconds=1.0)
    return ResultRecord(metadata=ResultRecordMetadata(serializer=JSONSerializer(), storage_key=name),
                        result=result).serialize()


def hostile(kind: str, folder: Path, name: str = KEY) -> bytes:
    """A record that would import or run code in Prefect's reader: ``pickle``, ``picklelib``, ``class``."""
    if kind == "pickle":
        return ResultRecord(metadata=ResultRecordMetadata(serializer=PickleSerializer(), storage_key=name),
                            result=LeavesAMarker(folder / "unpickled")).serialize()
    record = json.loads(own_record(name))
    if kind == "picklelib":
        record["metadata"]["serializer"] = {"type": "pickle", "picklelib": "tp_marker_picklelib"}
    else:
        record["result"] = json.dumps({"__class__": "tp_marker_class.Thing", "data": {}})
    return json.dumps(record).encode()


def test_a_record_a_stage_writes_passes():
    assert problem(KEY, own_record()) is None


@pytest.mark.parametrize("where", ["tasks.heads.stage.HeadResult", "tasks.export.stage.ExportResult",
                                   "tasks.select.stage.ScoreResult"])
def test_a_record_naming_a_result_class_where_it_was_before_the_plan_modules_passes(where):
    """Records written before heads, export and select got plan modules name their result class in the stage
    module, which still imports it: read as a hit (no warning, no recompute), and nothing new is imported."""
    import sys

    import tasks.export.stage, tasks.heads.stage, tasks.select.stage  # noqa: E401, F401 - imported by any run

    record = json.loads(own_record())
    record["result"] = json.dumps({"__class__": where, "data": {}})
    before = set(sys.modules)
    assert problem(KEY, json.dumps(record).encode()) is None
    assert "is not a stage result" in problem(KEY, json.dumps({**record, "result": json.dumps(
        {"__class__": "tasks.heads.stage.load_split", "data": {}})}).encode())
    assert set(sys.modules) == before


@pytest.mark.parametrize("change, why", [
    (lambda r: r["metadata"].update(serializer={"type": "pickle", "picklelib": "cloudpickle"}), "serializer"),
    (lambda r: r["metadata"].update(serializer={**r["metadata"]["serializer"], "object_decoder": "os.system"}),
     "serializer"),
    (lambda r: r["metadata"].update(serializer={**r["metadata"]["serializer"], "jsonlib": "this"}), "serializer"),
    (lambda r: r.update(result=json.dumps({"__class__": "this.Thing", "data": {}})), "result class 'this.Thing'"),
    (lambda r: r.update(result=json.dumps({"__class__": "tasks.extract.plan.ExtractResult",
                                           "data": {"path": {"__class__": "this.X", "data": 1}}})), "__class__ inside"),
    (lambda r: r.update(result=json.dumps([1, 2])), "not one stage result"),
    (lambda r: r["metadata"].update(storage_key="another-key"), "storage key"),
    (lambda r: r["metadata"].update(expiration="2099-01-01T00:00:00Z"), "expiration"),
    (lambda r: r.update(extra=1), "not a record"),
    (lambda r: r["metadata"].update(picklelib="x"), "metadata fields"),
])
def test_anything_but_transferpipes_own_shape_is_refused_by_name(change, why):
    record = json.loads(own_record())
    change(record)
    assert why in problem(KEY, json.dumps(record).encode())


def test_pickle_and_damage_are_refused_without_being_parsed(tmp_path):
    assert "serializer" in problem(KEY, hostile("pickle", tmp_path))
    assert problem(KEY, b"\x80\x04not json") == "not JSON"
    assert problem(KEY, own_record()[:-5]) == "not JSON"
    assert not (tmp_path / "unpickled").exists()


def test_the_stage_storage_reads_a_hostile_record_as_a_miss_and_imports_nothing(tmp_path, monkeypatch, caplog):
    """Prefect's own ``ResultStore.exists``/``read`` over the stages' storage: a miss, one warning, no import."""
    from prefect.results import ResultStore

    from flows.execution.trusted_records import StageRecords, UntrustedRecord

    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("tp_marker_picklelib", "tp_marker_class"):
        (tmp_path / f"{module}.py").write_text(MARKER_MODULE)
    records = tmp_path / "records"
    records.mkdir()
    store = ResultStore(result_storage=StageRecords(basepath=str(records)), serializer=JSONSerializer())
    for kind in ("pickle", "picklelib", "class"):
        name = f"{kind}-{KEY}"
        (records / name).write_bytes(hostile(kind, tmp_path, name))
        with caplog.at_level(logging.WARNING, logger="transferpipe.records"):
            assert not store.exists(name)
            with pytest.raises(UntrustedRecord):
                store.read(name)
        assert sum(name in r.getMessage() for r in caplog.records) == 1  # one warning per record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "tp_marker_class.py", "tp_marker_picklelib.py"]
    assert "tp_marker_class" not in sys.modules and "tp_marker_picklelib" not in sys.modules
    (records / KEY).write_bytes(own_record())
    assert store.exists(KEY) and store.read(KEY).result.rows == 3


@pytest.mark.slow
def test_hostile_records_in_a_shared_cache_run_nothing_and_change_no_number(tiny_config, tmp_path, monkeypatch):
    """Issue 43's probes, end to end: pickle, picklelib and ``__class__`` records planted over a finished run's
    records leave no marker; an edited, well-formed evaluation record changes no number; the next run replaces
    every planted record with one of its own, and every stage is still a cache hit."""
    from flows.execution.local import local_run_settings
    from flows.pipeline import pipeline_flow

    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("tp_marker_picklelib", "tp_marker_class"):
        (tmp_path / f"{module}.py").write_text(MARKER_MODULE)
    cfg = tiny_config(heads=[{"kind": "knn", "k": [1]}])
    with local_run_settings():
        first = pipeline_flow(cfg)
        records = cfg.cache_dir / "prefect-records"
        planted = {}
        for kind, prefix in (("pickle", "extract-split"), ("picklelib", "train-head"), ("class", "extract-split")):
            name = next(p.name for p in sorted(records.glob(f"{prefix}-*")) if p.name not in planted)
            (records / name).write_bytes(hostile(kind, tmp_path, name))
            planted[name] = kind
        evaluation = next(records.glob("evaluate-*"))
        edited = json.loads(evaluation.read_text())
        edited["result"] = edited["result"].replace('"top1": ', '"top1": 0.123, "was": ')
        assert '"top1": 0.123' in edited["result"]
        evaluation.write_text(json.dumps(edited))
        warned = Warned()
        logging.getLogger("transferpipe.records").addHandler(warned)  # Prefect's logging config stops propagation
        try:
            again = pipeline_flow(cfg)
        finally:
            logging.getLogger("transferpipe.records").removeHandler(warned)
    assert not (tmp_path / "unpickled").exists()
    assert not list(tmp_path.glob("imported-*")), "a planted record made Prefect import a module"
    assert [m.metrics["top1"] for m in again.models] == [m.metrics["top1"] for m in first.models] != [0.123]
    assert {s: r.key for s, r in again.features.items()} == {s: r.key for s, r in first.features.items()}
    assert all(r.cache_hit for r in again.features.values()) and all(h.cache_hit for h in again.heads)
    assert again.evaluation.cache_hit
    assert all(sum(name in w for w in warned.lines) == 1 for name in planted), warned.lines
    assert all(problem(name, (records / name).read_bytes()) is None for name in planted)  # replaced
