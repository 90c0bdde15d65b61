"""`python -m tuning.train`: one training run: a teacher, or a student distilled from one. See
`tuning.run.train`.
"""

from tuning.run.console import run_command
from tuning.run.train import main

if __name__ == "__main__":
    run_command(main)
