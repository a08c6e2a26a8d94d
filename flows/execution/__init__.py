"""Running the planned stages: each declared stage as a Prefect task with its content cache key and trusted
result records (stage_tasks.py, trusted_records.py), one job per GPU (device_slots.py), Dask workers
(scale_out.py), the server a run talks to (local.py: the ephemeral one or the one ``transferpipe server start``
runs, server.py) and the artifacts a run publishes (publish.py)."""
