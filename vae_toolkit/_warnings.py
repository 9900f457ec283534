"""The library's warnings: one category, ``VAEToolkitWarning``, pointing at the caller's line.

Every ``warnings.warn`` in this package uses ``VAEToolkitWarning``, so one filter line silences them all
(``warnings.filterwarnings("ignore", category=VAEToolkitWarning)``).

``warnings.warn(..., stacklevel=caller_stacklevel())`` names the first frame outside ``vae_toolkit``,
whichever public function was called and however deep inside the package the warning is raised
(a fixed ``stacklevel`` is right for one call path only). Python 3.12's ``skip_file_prefixes`` does the
same, but only from 3.12 on; walking the frames works on every supported version.
"""

from __future__ import annotations

import os
import sys

__all__ = ["VAEToolkitWarning", "caller_stacklevel"]


class VAEToolkitWarning(UserWarning):
    """Every warning vae-toolkit emits (a fallback taken, values clipped, ...): the result is still returned.

    Silence them all with ``warnings.filterwarnings("ignore", category=vae_toolkit.VAEToolkitWarning)``.
    """

    __module__ = "vae_toolkit"  # shown as vae_toolkit.VAEToolkitWarning, the name to filter on


_PACKAGE_PREFIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes ``warnings.warn``, called by the function calling this, name the
    first frame outside this package (the user's code)."""
    level = 1
    frame = sys._getframe(1)  # the function that is about to call warnings.warn
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_PREFIX):
        frame = frame.f_back
        level += 1
    return level
