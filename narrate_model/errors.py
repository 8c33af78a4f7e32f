"""Errors that point the user at the input to fix."""


class NarrateInputError(ValueError):
    """Bad user input: names the input and says what to do about it.

    Library code raises it with the input's name (the name the node's socket or widget has); the node layer adds the
    node's name, so the user reads e.g. "Voice Profile Encode: input 'voice': the clip is silent; ...".
    """

    def __init__(self, input_name: str, message: str):
        super().__init__(f"input '{input_name}': {message}")
        self.input_name = input_name
        self.message = message


class CheckpointError(ValueError):
    """A checkpoint that is missing, of the wrong model, or whose keys or shapes do not match."""
