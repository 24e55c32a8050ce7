"""What a ``prepare.py`` step reports: its exit statuses and the error for input it cannot use."""

EXIT_OK, EXIT_INCOMPLETE, EXIT_BAD_INPUT = 0, 1, 2


class InputError(ValueError):
    """Input a step cannot use; the message says what is wrong and what was expected."""
