"""The one error type policy loading raises: where (file, document path, line) and what."""


class PolicyError(ValueError):
    """A policy that cannot be loaded. str() is "FILE:LINE: PATH: MESSAGE", unknown parts left out.

    `path` is the place inside the document ("spec.rules[2].when", "" for the document itself);
    `errors` holds every problem found (this one first), so `optd policy check` can list them all.
    """

    def __init__(self, message: str, path: str = "", file: str | None = None, line: int | None = None,
                 errors: list["PolicyError"] | None = None):
        self.message = message
        self.path = path
        self.file = file
        self.line = line
        self.errors: list[PolicyError] = errors if errors else [self]
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}:{self.line}" if self.line is not None else self.file)
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.path:
            parts.append(self.path)
        parts.append(self.message)
        return ": ".join(parts)

