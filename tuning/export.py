"""`python -m tuning.export`: fold a trained student and export it to TorchScript and ONNX. See
`tuning.measure.export`.
"""

import sys

from tuning.measure.export import main

if __name__ == "__main__":
    sys.exit(main())
