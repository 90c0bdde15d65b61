import sys

from tuning.search.cli import main

sys.exit(main())
