"""`python -m nativelm.cli ...` (as torchrun starts it): the `nativelm` command."""

import sys

from nativelm.cli import main

sys.exit(main())
