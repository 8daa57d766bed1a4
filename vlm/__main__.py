"""`python -m vlm ...`: the same as the `vlm` command."""

import sys

from vlm.cli import main

sys.exit(main())
