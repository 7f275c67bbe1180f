"""User-facing errors: one clear line that names the input and the fix; the CLI prints it and exits non-zero."""


class HideSeekError(Exception):
    """A problem with the user's input or environment (not a bug): shown as one line, no traceback."""


class InputError(HideSeekError):
    """An input file or argument is unusable; the message names it and says how to fix it."""


class BundleError(HideSeekError):
    """A model bundle is missing, malformed or tampered with."""


class Cancelled(Exception):
    """Raised from a progress callback to stop a running computation; nothing partial is returned or written."""
