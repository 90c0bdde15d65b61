"""`python -m tuning.export`: fold a trained student and export it to TorchScript and ONNX. See
`tuning.measure.export`.
"""

from tuning.measure.export import main
from tuning.run.console import run_command

if __name__ == "__main__":
    run_command(main)
