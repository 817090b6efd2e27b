"""The ``mmeff`` console script: ``python -m mmeff.cli ...`` is the same as ``mmeff ...``."""

import sys

from mmeff.cli.main import main

sys.exit(main())
