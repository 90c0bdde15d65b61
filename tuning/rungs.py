"""`python -m tuning.rungs`: where early stopping can judge a cell's trials, measured on a FIFO
pilot. See `tuning.search.cli.rungs`.
"""

from tuning.run.console import run_command
from tuning.search.cli.rungs import main

if __name__ == "__main__":
    run_command(main)
