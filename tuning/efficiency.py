"""`python -m tuning.efficiency`: does the search pay? Search strategies at one budget of
epochs. See `tuning.measure.efficiency`.
"""

from tuning.measure.efficiency import main
from tuning.run.console import run_command

if __name__ == "__main__":
    run_command(main)
