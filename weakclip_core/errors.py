"""The one base class of the library's errors about inputs a user can fix.

A bad params value, dataset file, CAM store, weights file or artifact raises a subclass of
:class:`InputError` whose message names the file or the key. The library does not know how it is run:
the stage runner (``pipeline/_stage.py``) turns these errors into one line and an exit status, and adds
what to run when an upstream artifact is missing.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input the user can fix (a file, a params key, an artifact); the message names it."""
