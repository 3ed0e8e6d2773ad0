"""The generated protobuf modules under short names.

    from policyagent.pb import pb, admin_pb
"""

from policyagent._proto.policyagent.v1 import admin_pb2 as admin_pb
from policyagent._proto.policyagent.v1 import admin_pb2_grpc as admin_grpc
from policyagent._proto.policyagent.v1 import agent_pb2 as agent_pb
from policyagent._proto.policyagent.v1 import agent_pb2_grpc as agent_grpc
from policyagent._proto.policyagent.v1 import assignment_pb2 as assign_pb
from policyagent._proto.policyagent.v1 import assignment_pb2_grpc as assign_grpc
from policyagent._proto.policyagent.v1 import directory_pb2 as directory_pb
from policyagent._proto.policyagent.v1 import directory_pb2_grpc as directory_grpc
from policyagent._proto.policyagent.v1 import distribution_pb2 as dist_pb
from policyagent._proto.policyagent.v1 import distribution_pb2_grpc as dist_grpc
from policyagent._proto.policyagent.v1 import enrollment_pb2 as enroll_pb
from policyagent._proto.policyagent.v1 import enrollment_pb2_grpc as enroll_grpc
from policyagent._proto.policyagent.v1 import fleet_pb2 as fleet_pb
from policyagent._proto.policyagent.v1 import fleet_pb2_grpc as fleet_grpc
from policyagent._proto.policyagent.v1 import identity_pb2 as identity_pb
from policyagent._proto.policyagent.v1 import identity_pb2_grpc as identity_grpc
from policyagent._proto.policyagent.v1 import policy_pb2 as pb
from policyagent._proto.policyagent.v1 import relay_pb2 as relay_pb
from policyagent._proto.policyagent.v1 import relay_pb2_grpc as relay_grpc

# Stores with thousands of policies exceed gRPC's 4 MB default in GetStore/export.
GRPC_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
]

__all__ = [
    "GRPC_MAX_MESSAGE_BYTES",
    "GRPC_MESSAGE_OPTIONS",
    "admin_grpc",
    "admin_pb",
    "agent_grpc",
    "agent_pb",
    "assign_grpc",
    "assign_pb",
    "directory_grpc",
    "directory_pb",
    "dist_grpc",
    "dist_pb",
    "enroll_grpc",
    "enroll_pb",
    "fleet_grpc",
    "fleet_pb",
    "identity_grpc",
    "identity_pb",
    "pb",
    "relay_grpc",
    "relay_pb",
]
