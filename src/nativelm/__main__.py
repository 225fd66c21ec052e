"""`python -m nativelm`: the same as the `nativelm` command."""

import sys

from nativelm.cli import main

sys.exit(main())
