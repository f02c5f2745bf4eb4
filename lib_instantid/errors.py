"""User-facing errors.

Every error a user can see is an ``InstantIDError`` whose message is one or two plain sentences
that say what went wrong and what to do (which file, which folder). Code that catches it shows the
message as is; anything else that escapes is a bug.
"""


class InstantIDError(Exception):
    """An error with a message meant for the user."""


class ModelFileError(InstantIDError):
    """A model file is missing, unreadable, unsafe or of the wrong kind."""


class FaceAnalysisError(InstantIDError):
    """Face analysis cannot run (models missing) or found no usable face."""


class InputError(InstantIDError):
    """A UI or API input is invalid; the message names the field."""
