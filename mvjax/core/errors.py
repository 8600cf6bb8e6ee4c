"""The one base class of every error mvjax reports to a user.

Each CLI catches :class:`MvjaxError` once and prints its first line; anything else is a bug
and gets a one-line summary too (``MVJAX_DEBUG=1`` shows the traceback). Subclasses keep a
standard base as well (``ValueError``, ``OSError`` ...) where callers expect one.
"""


class MvjaxError(Exception):
    """A problem with the user's input, files or environment, explained in its first line."""
