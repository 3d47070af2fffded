"""`python -m ferry.services.scheduler [flags]`: the scheduler process alone."""

import sys

from ferry.services.scheduler.entry import main

sys.exit(main())
