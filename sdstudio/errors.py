"""Errors meant for the user: one clear line naming the problem and what to do."""


class SdStudioError(Exception):
    """An error caused by the user's input (a file, an option, a prompt); shown without a traceback."""


class CheckpointError(SdStudioError):
    """A file that cannot be loaded as a Stable Diffusion checkpoint."""
