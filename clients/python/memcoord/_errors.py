"""The one exception type of the package: a request memcoord answered with ``success: false``."""

from __future__ import annotations

from typing import Optional

__all__ = ["MemcoordError"]


class MemcoordError(Exception):
    """An error answered by memcoord (or by its claim socket).

    :ivar code: the contract's ``error_code`` (``"OUT_OF_MEMORY"``, ``"EXPORT_NOT_FOUND"``, …).
    :ivar message: the ``error_message``, written for people.
    :ivar status: the ``status_code`` (the HTTP status), or ``None`` where the answer had none.
    :ivar request_id: the request's id, or ``None`` (claims, lines the server could not parse).

    ``error_code``, ``error_message`` and ``status_code`` are the same values under the wire's
    names (what ``memcoord_client.MemcoordError`` had).
    """

    def __init__(
        self,
        code: Optional[str],
        message: Optional[str],
        status: Optional[int] = None,
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(f"{code} ({status}): {message}" if status is not None else f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id

    @property
    def error_code(self) -> Optional[str]:
        """Same as :attr:`code`."""
        return self.code

    @property
    def error_message(self) -> Optional[str]:
        """Same as :attr:`message`."""
        return self.message

    @property
    def status_code(self) -> Optional[int]:
        """Same as :attr:`status`."""
        return self.status
