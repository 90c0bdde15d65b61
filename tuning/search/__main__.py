"""`python -m tuning.search`: the search command. See `tuning.search.cli.search`."""

from tuning.run.console import run_command
from tuning.search.cli.search import main

run_command(main)
