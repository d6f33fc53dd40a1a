"""The one exception type of the protocol, carrying the wire error code."""


class ProtocolError(Exception):
    """A peer broke the protocol. `code` is the wire `error.code`; `fatal` closes the link."""

    def __init__(self, code: str, message: str, *, fatal: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
