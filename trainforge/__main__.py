"""`python -m trainforge` (what torchrun launches) is the `trainforge` command."""

from .cli import console

console()
