"""Both halves of a run under one name: its identity (:mod:`dtg.run_identity`: hash, fingerprints,
provenance) and its execution (:mod:`dtg.run_exec`: subprocesses, progress monitor).

Nothing in the package imports this module (the engine imports :mod:`dtg.run_identity` only);
it keeps ``dtg.runs`` for scripts and tests that address both halves through one name.
"""

import subprocess  # noqa: F401  (``runs.subprocess.run`` is what run_exec calls)

from dtg.progress import MAIN_LOSSES, progress_line, progress_state  # noqa: F401
from dtg.run_exec import (  # noqa: F401
    ProgressMonitor, Run, branch_from, ensure_generated, execute, read_progress, run_one, trained_twin,
    _adopt, _readiness,
)
from dtg.run_identity import (  # noqa: F401
    EVALUATION_ONLY, NEUTRAL_KEYS, SUPERVISED_IGNORES, SUPERVISED_READS, VOLATILE_KEYS, branch_key, config_hash,
    cpu_capability, cpu_name, dataset_fingerprint, git_state, hashed_dict, iteration_checkpoint, library_versions,
    provenance, run_difference, run_key, supervised_part, training_key, val_fingerprint,
)
