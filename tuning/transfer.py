"""`python -m tuning.transfer`: whether a ranking of configurations carries from a cheap
setting to a dear one. See `tuning.measure.transfer`.
"""

from tuning.measure.transfer import main
from tuning.run.console import run_command

if __name__ == "__main__":
    run_command(main)
