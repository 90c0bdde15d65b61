"""`python -m tuning.replicate`: train a finished search's chosen and default configurations
again with new seeds. See `tuning.search.cli.replicate`.
"""

from tuning.run.console import run_command
from tuning.search.cli.replicate import main

if __name__ == "__main__":
    run_command(main)
