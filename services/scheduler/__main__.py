"""`python -m services.scheduler [flags]`: the scheduler process alone."""

import sys

from services.scheduler.main import main

sys.exit(main())
