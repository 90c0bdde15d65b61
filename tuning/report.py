"""`python -m tuning.report`: the paper's tables from a search, from unselected replicates. See
`tuning.search.cli.report`.
"""

from tuning.run.console import run_command
from tuning.search.cli.report import main

if __name__ == "__main__":
    run_command(main)
