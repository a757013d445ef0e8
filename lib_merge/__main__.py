"""`python -m lib_merge …`: merge, inspect and demo from the command line."""

import sys

from .cli.main import main

sys.exit(main())
