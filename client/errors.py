"""The one exception tree of zbroker, and the table that maps wire error codes to it.

BrokerError                      root; ``retriable`` says whether trying again may succeed
├── BrokerConnectionError        no node answered (retriable)
├── BrokerTimeoutError           gave up after ``timeout`` (also a ``TimeoutError``)
├── NotLeaderError               the node is not the leader; carries the leader's endpoint (retriable)
├── UnavailableError             the node cannot serve now, e.g. shutting down (retriable)
├── SessionUnknownError          the node does not know this session any more (retriable)
├── ProtocolError                a frame was malformed, of an unknown kind or version
├── InvalidChannelError          a channel name breaks the naming rules
├── MessageTooLargeError         a message is larger than the node's ``max_message_bytes``
├── InvalidArgumentError         an argument has the wrong type or range
├── PayloadValidationError       a payload does not match the channel's type (raised before sending)
├── StaleLeaseError              an ack or nack for a lease that expired or moved to another worker
├── NotFoundError                the named queue or object does not exist
├── ConfigError                  a configuration file or variable is invalid
└── InternalError                the node failed in a way it did not expect
"""

from __future__ import annotations

from broker.protocol import ErrorCode


class BrokerError(Exception):
    """Raised for every failure zbroker reports; the root of the tree above."""

    retriable: bool = False
    code: ErrorCode = ErrorCode.INTERNAL


class BrokerConnectionError(BrokerError):
    """Raised when no node answered within the heartbeat liveness window."""

    retriable = True
    code = ErrorCode.UNAVAILABLE


class BrokerTimeoutError(BrokerError, TimeoutError):
    """Raised when an operation did not complete within its ``timeout``."""

    retriable = False
    code = ErrorCode.UNAVAILABLE


class NotLeaderError(BrokerError):
    """Raised when a request reached a node that is not the leader of the group."""

    retriable = True
    code = ErrorCode.NOT_LEADER

    def __init__(self, message: str, leader_endpoint: str | None = None) -> None:
        super().__init__(message)
        self.leader_endpoint = leader_endpoint


class UnavailableError(BrokerError):
    """Raised when the node cannot serve the request now (shutting down, no quorum)."""

    retriable = True
    code = ErrorCode.UNAVAILABLE


class SessionUnknownError(BrokerError):
    """Raised when the node does not know the consumer session; the client says HELLO again."""

    retriable = True
    code = ErrorCode.SESSION_UNKNOWN


class ProtocolError(BrokerError):
    """Raised when a frame is malformed, of an unknown command or of an unsupported version."""

    code = ErrorCode.MALFORMED_FRAME


class InvalidChannelError(BrokerError, ValueError):
    """Raised when a channel name breaks the naming rules (see ``docs/protocol.md``)."""

    code = ErrorCode.INVALID_CHANNEL


class MessageTooLargeError(BrokerError, ValueError):
    """Raised when an encoded message exceeds the node's ``max_message_bytes``."""

    code = ErrorCode.MESSAGE_TOO_LARGE


class InvalidArgumentError(BrokerError, ValueError):
    """Raised when an argument has the wrong type or is out of range."""

    code = ErrorCode.INVALID_ARGUMENT


class PayloadValidationError(BrokerError, ValueError):
    """Raised when a payload does not match its channel's type; nothing was sent."""

    code = ErrorCode.INVALID_PAYLOAD


class StaleLeaseError(BrokerError):
    """Raised when an ack or nack names a lease that expired or was handed to another worker."""

    code = ErrorCode.STALE_LEASE


class NotFoundError(BrokerError):
    """Raised when the named queue or object does not exist."""

    code = ErrorCode.NOT_FOUND


class ConfigError(BrokerError, ValueError):
    """Raised when a configuration file or ``ZBROKER_*`` variable is invalid; names the key."""

    code = ErrorCode.INVALID_ARGUMENT


class InternalError(BrokerError):
    """Raised when the node failed in a way it did not expect; see the node's log."""

    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[BrokerError]] = {
    ErrorCode.MALFORMED_FRAME: ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolError,
    ErrorCode.UNKNOWN_COMMAND: ProtocolError,
    ErrorCode.INVALID_CHANNEL: InvalidChannelError,
    ErrorCode.MESSAGE_TOO_LARGE: MessageTooLargeError,
    ErrorCode.INVALID_ARGUMENT: InvalidArgumentError,
    ErrorCode.INVALID_PAYLOAD: PayloadValidationError,
    ErrorCode.SESSION_UNKNOWN: SessionUnknownError,
    ErrorCode.STALE_LEASE: StaleLeaseError,
    ErrorCode.NOT_LEADER: NotLeaderError,
    ErrorCode.UNAVAILABLE: UnavailableError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.INTERNAL: InternalError,
}


def error_from_code(code: int, message: str, leader_endpoint: str | None = None) -> BrokerError:
    """Build the exception for a wire error code; unknown codes become ``InternalError``."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return InternalError(f"unknown error code {code}: {message}")
    cls = _BY_CODE.get(known, InternalError)
    if cls is NotLeaderError:
        return NotLeaderError(message, leader_endpoint)
    error = cls(message)
    if cls is ProtocolError:
        error.code = known
    return error
