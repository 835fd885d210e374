"""orders: an async gRPC order service and its Python client library.

from orders import OrderClient, Item, OrderStatus
"""

from orders._proto.orders.v1 import Order, OrderItem, OrderStatus, StatusUpdate
from orders.client import Item, OrderClient, RetryPolicy
from orders.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OrderError,
    OutOfRange,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Item",
    "NotFound",
    "Order",
    "OrderClient",
    "OrderError",
    "OrderItem",
    "OrderStatus",
    "OutOfRange",
    "ResourceExhausted",
    "RetryPolicy",
    "StatusUpdate",
    "Unauthenticated",
    "Unavailable",
]
