"""``python -m hideseek``: the same command line as the ``hideseek`` script (the Slicer module runs it this way
with PythonSlicer, where no console script is installed)."""

import sys

from .cli import main

sys.exit(main())
