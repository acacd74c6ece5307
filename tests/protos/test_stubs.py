"""The checked-in stubs match the .proto sources."""

from expertmesh.protos.build import ROOT, generate


def test_checked_in_stubs_equal_freshly_generated_ones(tmp_path):
    for fresh in generate(tmp_path):
        checked_in = ROOT / fresh.relative_to(tmp_path)
        stale = f"{checked_in.name} is stale: run python -m expertmesh.protos.build"
        assert checked_in.read_text() == fresh.read_text(), stale
