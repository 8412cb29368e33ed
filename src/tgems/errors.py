"""The package's own exception: every user-facing failure raises it, and the CLI turns it into one line."""


class TGEMError(Exception):
    """A clear, one-line error about user input (bad model, data, checkpoint, tensor or option)."""
