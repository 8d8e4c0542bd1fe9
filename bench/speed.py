"""Where a training step's time goes; the same as ``dtg bench speed``.

    python bench/speed.py --help
    python bench/speed.py --sections step data --repeat 3
    python bench/speed.py --profile --sections step

Implementation: :mod:`dtg.bench.speed` (so that the installed ``dtg`` command has it too).
"""

import sys

from dtg.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
