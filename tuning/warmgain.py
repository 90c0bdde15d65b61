"""`python -m tuning.warmgain`: what a warm start buys, in trials. See
`tuning.measure.warmgain`.
"""

import sys

from tuning.measure.warmgain import main

if __name__ == "__main__":
    sys.exit(main())
