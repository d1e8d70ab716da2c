import sys
from pathlib import Path

# tools/ holds the container harness shared by tests, bench and the demo.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
