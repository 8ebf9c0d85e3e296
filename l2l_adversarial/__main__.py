"""``python -m l2l_adversarial``: the command line (see :mod:`l2l_adversarial.cli`)."""

import sys

from l2l_adversarial.cli import main

sys.exit(main())
