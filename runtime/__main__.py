"""`python -m runtime ...` works like the `runtime` command."""

import sys

from .cli import main

sys.exit(main())
