"""The generated protobuf modules under short names.

    from policyagent.pb import pb, admin_pb
"""

from policyagent._proto.policyagent.v1 import admin_pb2 as admin_pb
from policyagent._proto.policyagent.v1 import admin_pb2_grpc as admin_grpc
from policyagent._proto.policyagent.v1 import policy_pb2 as pb

__all__ = ["admin_grpc", "admin_pb", "pb"]
