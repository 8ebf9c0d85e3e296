"""``python -m l2l_adversarial`` and the ``l2l-adversarial`` command: the application's
command line (:mod:`l2l_adversarial.app.cli`), imported inside :func:`main` so that Ctrl-C
while it loads (torch, learn2learn: seconds) ends with one line and status 130 too."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (:func:`l2l_adversarial.app.cli.main`)."""
    try:
        from l2l_adversarial.app import cli
    except KeyboardInterrupt:
        print("interrupted (SIGINT) while starting; nothing was written, run it again",
              file=sys.stderr)  # fmt: skip
        return 130
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
