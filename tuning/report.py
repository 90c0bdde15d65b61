"""`python -m tuning.report`: the paper's tables from a search, from unselected replicates. See
`tuning.search.cli.report`.
"""

import sys

from tuning.search.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
