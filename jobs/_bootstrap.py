"""Make `karma` importable when a job runs from a source checkout (e.g. `ray job submit
--working-dir .`), where the package may not be installed on the cluster's nodes."""

import os
import sys
from pathlib import Path

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")
if PLATFORM not in sys.path:
    sys.path.insert(0, PLATFORM)
# Ray workers start in the working dir, not this script's: hand them the path too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (PLATFORM, os.environ.get("PYTHONPATH")) if p)
