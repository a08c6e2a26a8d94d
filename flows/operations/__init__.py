"""Running transferpipe as a service: the local Prefect server (server.py), served deployments on schedules
and data changes (serve.py), and the watcher that announces new data (watch.py)."""
