"""Export, evaluate and health-check a trained model through the stage functions, where DVC is not installed.

    python bench/export_release.py PARAMS_FILE

The GPU machines have no DVC (the `nativelm` stage commands import it), so `bench/gpu_families.sh`
exports its models with this: `run_export` of train.model_file, `run_evaluate` of the export, then the
board runtime's `health` on the release folder (exit status: the health check's).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nativelm.evaluate.stage import Provenance, run_evaluate
from nativelm.export.stage import run_export
from nativelm.params.root import load_params


def main() -> int:
    params = load_params(Path(sys.argv[1]))
    data = Path(params.data.out_dir)
    exported = run_export(Path(params.train.model_file), data, params.export)
    run_evaluate(exported.out_dir, data, params.evaluate, Provenance("bench", "", ""))
    return subprocess.call([sys.executable, "-m", "nativelm.runtime", "health", "--model", params.evaluate.release_dir])


if __name__ == "__main__":
    sys.exit(main())
