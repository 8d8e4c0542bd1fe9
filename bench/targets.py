"""Target quality of a checkpoint's teacher, per method and stage; the same as ``dtg bench targets``.

    python bench/targets.py --checkpoint runs/embedded/dtg/checkpoints/last.pth

Implementation: :mod:`dtg.bench.targets` (so that the installed ``dtg`` command has it too).
"""

import sys

from dtg.bench.targets import main

if __name__ == "__main__":
    sys.exit(main())
