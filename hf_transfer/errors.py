"""The one exception type for mistakes a user can fix."""


class HfTransferError(Exception):
    """A mistake the user can fix; the message says what to do."""
