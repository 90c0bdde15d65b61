"""`python -m tuning.transfer`: whether a ranking of configurations carries from a cheap
setting to a dear one. See `tuning.measure.transfer`.
"""

import sys

from tuning.measure.transfer import main

if __name__ == "__main__":
    sys.exit(main())
