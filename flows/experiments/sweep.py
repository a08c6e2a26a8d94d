"""Sweeps: many experiments from one base config, run concurrently, sharing every cached stage.

Each experiment is the whole pipeline, run as a subflow inside one task, and
the tasks run on a thread pool (``concurrency`` at once). Nothing is
coordinated here: experiments that need the same features compute the same
content key, the first takes the key's lock and extracts, the others wait on
it and reuse the file (no forward pass). The same holds for heads and
fine-tuning runs. One failed experiment does not stop the others; the sweep
then ends Failed, naming it.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.config import ExperimentConfig, SweepConfig
from flows.execution.publish import publish_table
from flows.pipeline import PipelineResult, pipeline_flow


class SweepResult(BaseModel):
    name: str
    experiments: list[PipelineResult]
    failed: dict[str, str]  # experiment name -> why

    def rows(self) -> list[dict]:
        """One row per experiment: its best model on the test split, and what its stages cost."""
        rows = []
        for r in sorted(self.experiments, key=lambda r: -r.models[0].metrics["top1"]):
            best = r.models[0]
            rows.append({
                "experiment": r.experiment, "best model": best.name, "shots": str(best.shot),
                "top1": best.metrics["top1"], "macro_f1": best.metrics["macro_f1"],
                "forward batches": int(r.stages["extract"]["forward_batches"]),
                "head fits": int(r.stages.get("heads", {}).get("fits", 0)), "report": str(r.report),
            })
        return rows


@task(name="experiment")
def experiment_task(config: ExperimentConfig) -> PipelineResult:
    return pipeline_flow(config)


@flow(name="sweep", flow_run_name="sweep-{name}", validate_parameters=False)
def sweep_flow(name: str, configs: list[ExperimentConfig]) -> SweepResult:
    """Run every experiment of a sweep; the caller sets the concurrency (see :func:`run_sweep`)."""
    futures = [experiment_task.with_options(task_run_name=f"experiment-{c.name}").submit(c) for c in configs]
    done, failed = [], {}
    for config, future in zip(configs, futures):
        future.wait()
        try:
            done.append(future.state.result())
        except Exception as exc:  # noqa: BLE001 - reported per experiment, the sweep goes on
            failed[config.name] = f"{type(exc).__name__}: {exc}"
    result = SweepResult(name=name, experiments=done, failed=failed)
    if done:
        publish_table(f"sweep-{name}", result.rows(), f"sweep {name}: experiments ranked by their best model's top-1")
    if failed:
        names = ", ".join(failed)
        return Failed(message=f"{len(failed)} of {len(configs)} experiment(s) failed: {names}", data=result)
    return result


def run_sweep(sweep: SweepConfig, name: str, configs: list[ExperimentConfig]):
    """The sweep flow's final state (Completed, or Failed naming the failed experiments)."""
    runner = ThreadPoolTaskRunner(max_workers=min(sweep.concurrency, len(configs)))
    return sweep_flow.with_options(task_runner=runner)(name, configs, return_state=True)
