"""``python -m tinylm.cli`` (and ``torchrun ... -m tinylm.cli``): the ``tinylm`` command."""

import sys

from tinylm.cli import main

sys.exit(main())
