"""`python -m trainforge` (what torchrun launches) is the `trainforge` command."""

import sys

from .cli import main

sys.exit(main())
