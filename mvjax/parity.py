"""``python -m mvjax.parity``: Check mvjax against a reference fixture directory (the command lives in :mod:`mvjax.cli.parity`)."""

from mvjax.cli.parity import main

if __name__ == "__main__":
    from mvjax.cli.common import exit_now

    exit_now(main())
