"""User-facing errors: raised for bad input, printed by the CLI as one line, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (file, field, value). The message is shown as-is."""


class ConfigError(UserError):
    """One or more configuration problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__("\n".join(f"{where}{p}" for p in self.problems))
