"""The one error type for user mistakes.

Everything a user can get wrong (a bad file, option, config or data spec) raises
`XaiCompressError` with a one-line message that names the input and what was expected.
The CLI catches it once and turns it into that line on stderr and exit code 2.
"""


class XaiCompressError(Exception):
    """A user error: bad input file, option, config or data."""

    def __init__(self, message: str) -> None:
        # Keep it on one line: the CLI prints it verbatim.
        super().__init__(" ".join(str(message).split()))
