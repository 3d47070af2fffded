"""`python -m services.scheduler [flags]`: the scheduler process alone."""

import sys

from services.scheduler.entry import main

sys.exit(main())
