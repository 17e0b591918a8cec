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
