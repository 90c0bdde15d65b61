"""`python -m tuning.bench`: benchmarks: the training step, inference, and the search's
overhead. See `tuning.measure.bench`.
"""

from tuning.measure.bench import main
from tuning.run.console import run_command

if __name__ == "__main__":
    run_command(main)
