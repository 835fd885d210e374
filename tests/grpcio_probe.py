"""Ask a running server what grpcurl would ask, using only grpcio, grpcio-health-checking and grpcio-reflection.

Run as ``python tests/grpcio_probe.py PORT``; prints one JSON object. It is a separate process because
grpcio-health-checking and grpcio-reflection register ``grpc.health.v1`` and ``grpc.reflection.v1alpha`` in
protobuf's default descriptor pool, where grpclib (imported by the test session through ``orders``) has
already registered its own copies under other file names; protobuf refuses the duplicate symbols.
Nothing here imports ``orders``: all it knows about the service is what reflection tells it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
from descriptor_shapes import field_shapes
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "orders.v1.OrderService"


def health(channel: grpc.Channel, service: str) -> str:
    """The serving status for ``service``, or the gRPC status code name if the check fails."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(port: int) -> dict[str, Any]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE)
        messages = {
            name: field_shapes(pool.FindMessageTypeByName(name))
            for name in ("orders.v1.Order", "orders.v1.OrderItem", "orders.v1.OrderStatusStreamRequest")
        }
        # What `grpcurl -d '{...}' host:port orders.v1.OrderService/CreateOrder` does: build the request
        # from reflected descriptors only, call, decode the reply with the reflected response type.
        create = service.methods_by_name["CreateOrder"]
        request_class = message_factory.GetMessageClass(create.input_type)
        response_class = message_factory.GetMessageClass(create.output_type)
        body = {"items": [{"product_name": "A", "quantity": 1, "price": 2.5}]}
        request = json_format.ParseDict(body, request_class())
        call = channel.unary_unary(
            f"/{SERVICE}/CreateOrder",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        created = json_format.MessageToDict(call(request, timeout=10), preserving_proto_field_name=True)
        services = sorted(database.get_services())
        return {
            "services": services,
            # `grpcurl describe` with no symbol: every listed service must resolve to its methods.
            "described": {name: [m.name for m in pool.FindServiceByName(name).methods] for name in services},
            "health": {name: health(channel, name) for name in ("", SERVICE, "no.such.Service")},
            "service_file": service.file.name,
            "methods": [
                {
                    "name": m.name,
                    "input": m.input_type.full_name,
                    "output": m.output_type.full_name,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in service.methods
            ],
            "messages": messages,
            "enum": [(v.name, v.number) for v in pool.FindEnumTypeByName("orders.v1.OrderStatus").values],
            "created": created,
        }


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
