"""`python -m meshlm ...` (what torchrun launches: `torchrun ... -m meshlm train ...`)."""

import sys

try:
    from meshlm.cli import main
except KeyboardInterrupt:  # Ctrl-C while the worker was still importing: no traceback, the usual code
    sys.exit(130)

sys.exit(main())
