"""`python -m tuning.search`: the search command. See `tuning.search.cli.search`."""

import sys

from tuning.search.cli.search import main

sys.exit(main())
