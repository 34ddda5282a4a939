"""`python -m trainforge` (what torchrun launches) is the `trainforge` command."""

from .cli import exit_with, main

exit_with(main())
