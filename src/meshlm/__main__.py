"""`python -m meshlm ...` (what torchrun launches: `torchrun ... -m meshlm train ...`)."""

import sys

from meshlm.cli import main

sys.exit(main())
