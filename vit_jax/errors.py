"""The base class of errors caused by the user's input (config, files, data), reported in one line."""


class UserError(Exception):
    """Bad input: a config that cannot work, a missing dataset, a foreign or mismatched file.

    Command-line entry points (`vit_jax.cli.run`) print its message on one line and exit with code 2.
    """
