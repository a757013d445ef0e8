"""`python -m lib_merge …`: merge, inspect and demo from the command line."""

import sys

from .cli import main

sys.exit(main())
