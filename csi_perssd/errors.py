"""The one way logic fails: CsiError(code, message), mapped to a gRPC status at the edge."""
from __future__ import annotations

import grpc

Code = grpc.StatusCode


class CsiError(Exception):
    """A failure with the gRPC status code the CSI spec names for it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class Fenced(CsiError):
    """Proof from the catalog that this node was fenced out of a volume: the volume record names
    another owner or a newer ownership epoch than the one the node holds. Only the catalog raises
    it (the conditional commit, or a read of the record showing the new owner); a node that gets
    it may discard its uncommitted local changes at the next stage. Every other failure,
    FAILED_PRECONDITION included, keeps the local data and stays retriable."""

    def __init__(self, message: str):
        super().__init__(Code.FAILED_PRECONDITION, message)


def invalid(msg: str) -> CsiError:
    return CsiError(Code.INVALID_ARGUMENT, msg)


def not_found(msg: str) -> CsiError:
    return CsiError(Code.NOT_FOUND, msg)


def precondition(msg: str) -> CsiError:
    return CsiError(Code.FAILED_PRECONDITION, msg)


def internal(msg: str) -> CsiError:
    return CsiError(Code.INTERNAL, msg)


def unavailable(msg: str) -> CsiError:
    return CsiError(Code.UNAVAILABLE, msg)


def aborted(msg: str) -> CsiError:
    return CsiError(Code.ABORTED, msg)
