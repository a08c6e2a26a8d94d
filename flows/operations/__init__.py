"""Running transferpipe as a service: the pipeline served as a deployment on schedules and data changes
(serve.py) and the watcher that announces new data (watch.py); the server they talk to is execution/server.py."""
