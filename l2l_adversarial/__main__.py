"""``python -m l2l_adversarial`` and the ``l2l-adversarial`` command: the application's
command line (:mod:`l2l_adversarial.app.cli`)."""

import sys

from l2l_adversarial.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
