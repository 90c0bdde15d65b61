"""`python -m tuning.warmgain`: what a warm start buys, in trials. See
`tuning.measure.warmgain`.
"""

from tuning.measure.warmgain import main
from tuning.run.console import run_command

if __name__ == "__main__":
    run_command(main)
