"""Offline checks of what infra/ and terraform/ ship: `make infra-check` (`python -m infra.check`) runs them,
and tests/infra runs them too. Nothing here reaches a cloud, a cluster or a provider registry."""
