"""The one exception type that bad user input raises."""


class InvalidInputError(ValueError):
    """Raised for bad input: a missing or unreadable image, an unreachable URL, corrupt base64,
    an aspect ratio over 200, a prompt longer than the model's context, an unknown option, ...

    The message names the problem. It subclasses ValueError so ``except ValueError`` also catches it.
    """
