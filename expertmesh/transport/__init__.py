"""The data plane of the actor graph: per MoE layer, hidden states from the attention actors to the router
and routed outputs back; the router's work to the expert shards and their outputs back. Imports only
`protos` (and torch, gRPC): the actors plug their compute in through `ShardRuntime`.

- `work.py`: `ShardWork`, the `Dispatch` and `ShardRuntime` interfaces
- `codec.py`: tensors to and from the `Tensor` message (raw bytes, dtype, shape)
- `grpc_dispatch.py`, `grpc_route.py`: router <-> shards and attention <-> router over gRPC streams
- `collective.py`: both over torch.distributed (gloo)
- `inprocess.py`: shards in the router's process
- `grpc_server.py`, `auth.py`, `settings.py`: the one server helper, the per-graph secret, the limits
- `mailbox.py`, `errors.py`: futures by step and layer with deadlines; errors that name the peer at fault
"""

from expertmesh.transport.errors import DataPlaneError, PeerFault
from expertmesh.transport.settings import DataPlaneSettings
from expertmesh.transport.work import Dispatch, ShardRuntime, ShardWork

__all__ = ["DataPlaneError", "DataPlaneSettings", "Dispatch", "PeerFault", "ShardRuntime", "ShardWork"]
