"""`python -m tuning.train`: one training run: a teacher, or a student distilled from one. See
`tuning.run.train`.
"""

import sys

from tuning.run.train import main

if __name__ == "__main__":
    sys.exit(main())
