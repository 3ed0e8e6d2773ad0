"""The agent's cache of its last good effective policy (DESIGN §5).

One file, `STATE_DIR/cache/effective.pb` (a serialized agent.proto `CachedPolicy`),
written atomically (temp + fsync + rename) with mode 0600 because the policy carries
this agent's pre-shared keys. At start the daemon applies it when it cannot reach the
server and says so: "running on cached policy since T".
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from google.protobuf.message import DecodeError

from policyagent.agent.files import atomic_write
from policyagent.pb import agent_pb, dist_pb

CACHE_FILE = Path("cache") / "effective.pb"

_log = logging.getLogger("policyagent.agent.cache")


class PolicyCache:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CACHE_FILE

    def load(self) -> agent_pb.CachedPolicy | None:
        """The cached policy, or None if there is none or it is unreadable (logged, never fatal)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            _log.warning("cannot read the policy cache", extra={"path": str(self.path), "error": exc.strerror})
            return None
        cached = agent_pb.CachedPolicy()
        try:
            cached.ParseFromString(data)
        except DecodeError:
            _log.warning("the policy cache is corrupt; ignoring it", extra={"path": str(self.path)})
            return None
        if not cached.policy.version:
            return None
        return cached

    def save(self, policy: dist_pb.EffectivePolicy, source: str = "domain") -> None:
        cached = agent_pb.CachedPolicy(saved_unix_ms=int(time.time() * 1000), source=source)
        cached.policy.CopyFrom(policy)
        cached.policy.nonce = ""
        atomic_write(self.path, cached.SerializeToString())
