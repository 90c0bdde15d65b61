"""`python -m tuning.efficiency`: does the search pay? Search strategies at one budget of
epochs. See `tuning.measure.efficiency`.
"""

import sys

from tuning.measure.efficiency import main

if __name__ == "__main__":
    sys.exit(main())
