"""Tensors cross the wire intact inside the data plane's messages; bad messages are named."""

import pytest
import torch

from expertmesh.protos import expert_dispatch_pb2 as pb
from expertmesh.transport.codec import from_proto, to_proto


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(3, 5), (0, 7), (1,), ()])
def test_tensors_round_trip_bit_exactly_through_a_serialised_request(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    sent = t.t() if t.dim() == 2 else t  # a non-contiguous view too
    request = pb.ExpertRequest(step=7, layer=3, placement_version=2, hidden_states=to_proto(sent))
    back = from_proto(pb.ExpertRequest.FromString(request.SerializeToString()).hidden_states)
    expected = t.t() if t.dim() == 2 else t
    assert back.dtype == dtype and back.shape == expected.shape and torch.equal(back, expected)


@pytest.mark.parametrize("msg,needle", [
    (pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unknown dtype 'float64'"),
    (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), r"carries 20 bytes but float32 \[2, 3\] needs 24"),
    (pb.Tensor(dtype="int64", shape=[-1], data=b""), "negative dimension"),
])
def test_malformed_tensors_are_refused_with_the_reason(msg, needle):
    with pytest.raises(ValueError, match=needle):
        from_proto(msg, name="hidden_states")


def test_dtypes_that_cannot_cross_are_refused():
    with pytest.raises(ValueError, match="cannot cross"):
        to_proto(torch.zeros(2, dtype=torch.float64))
