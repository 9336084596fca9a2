"""`python -m proxy` is the `laneswitch` command."""

import sys

from proxy.cli import main

sys.exit(main())
