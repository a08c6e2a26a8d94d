"""The ``transferpipe`` command (commands.py: the app and the experiment's commands; service.py: serve and watch;
outputs.py: export and index; demo_cli.py; cache_cli.py and server_cli.py: the ``cache`` and ``server`` groups;
stage_commands.py: the commands derived from stage declarations) and what it prints (console.py: errors,
tables; views.py: each result's table). ``python -m flows.cli`` runs it too."""
from flows.cli.commands import app, main

__all__ = ["app", "main"]
