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


class OptionError(XaiCompressError):
    """A bad value of one named option of a step (`option` is its field name, e.g.
    "min_channels"); the CLI shows it as `--min-channels`, a config as
    `stages[0].min_channels`."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        self.option, self.value, self.reason = option, value, " ".join(str(reason).split())
        super().__init__(f"{option} {value!r}: {self.reason}")

    def named(self, name: str) -> XaiCompressError:
        """The same error with the option called `name` (a flag or a config path)."""
        return XaiCompressError(f"{name} {self.value!r}: {self.reason}")
