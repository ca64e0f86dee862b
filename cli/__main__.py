"""`python -m membrane.cli ...` runs the `membrane` command."""

import sys

from membrane.cli.main import main

sys.exit(main())
