"""``python -m mvjax.synthesize``: Text + a reference voice -> speech (the command lives in :mod:`mvjax.cli.synthesize`)."""

from mvjax.cli.common import exit_now
from mvjax.cli.synthesize import main

if __name__ == "__main__":
    exit_now(main())
