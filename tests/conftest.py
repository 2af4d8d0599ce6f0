import os
import sys
from pathlib import Path

# Tests run against the source tree even without an editable install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
