"""Run balloond as ``python -m balloond``."""

import sys

from balloond.cli import main

sys.exit(main())
