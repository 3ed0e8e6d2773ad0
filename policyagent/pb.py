"""The generated protobuf modules under short names.

    from policyagent.pb import pb, admin_pb
"""

from policyagent._proto.policyagent.v1 import admin_pb2 as admin_pb
from policyagent._proto.policyagent.v1 import admin_pb2_grpc as admin_grpc
from policyagent._proto.policyagent.v1 import policy_pb2 as pb

# Stores with thousands of policies exceed gRPC's 4 MB default in GetStore/export.
GRPC_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
]

__all__ = ["GRPC_MAX_MESSAGE_BYTES", "GRPC_MESSAGE_OPTIONS", "admin_grpc", "admin_pb", "pb"]
