"""Errors of the input pipeline."""

from vit_jax.errors import UserError


class DatasetError(UserError):
    """A dataset that is missing, unprepared, in the wrong format or inconsistent with the config.

    The message says where the dataset was looked for and the exact command that prepares it.
    """
