"""`python -m services.scheduler [flags]`: the scheduler process alone."""

import sys

from services.scheduler.cli import main

sys.exit(main())
