"""Errors of the input pipeline."""

from vit_jax.errors import UserError


class DatasetError(UserError):
    """A dataset that is missing, unprepared, in the wrong format or inconsistent with the config.

    The message says where the dataset was looked for and the exact command that prepares it.
    """


def for_entry(error: DatasetError, entry: str, fields: dict[str, str]) -> DatasetError:
    """`error` about a dataset entry of another list (`config.extra_evals`, `config.fewshot.datasets`), checked
    through a copy of the run's config: "ENTRY: message" with the run's fields the message names ("config.eval_split=")
    said as the entry's (`fields`: {"eval_split": "its split"}), which the run's own may not be."""
    message = str(error)
    for field, words in fields.items():
        message = message.replace(f"config.{field}=", f"{words} ")
    return DatasetError(f"{entry}: {message}")
