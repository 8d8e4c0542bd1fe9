"""The paper's comparison and DTG ablations over seeds; the same as ``dtg bench reproduce``.

    python bench/reproduce.py --help
    python bench/reproduce.py --rows all --jobs 2 --set solver.max_iter=300 --set solver.steps=[210,270]

Implementation: :mod:`dtg.bench.reproduce` (so that the installed ``dtg`` command has it too).
"""

import sys

from dtg.bench.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
