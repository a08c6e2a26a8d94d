"""``python -m flows.cli``: the ``transferpipe`` command."""
import sys

from flows.cli.commands import main

sys.exit(main())
