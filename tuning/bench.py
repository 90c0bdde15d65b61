"""`python -m tuning.bench`: benchmarks: the training step, inference, and the search's
overhead. See `tuning.measure.bench`.
"""

import sys

from tuning.measure.bench import main

if __name__ == "__main__":
    sys.exit(main())
