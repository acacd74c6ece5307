"""Random checkpoints and presets for tests and demos; `expertmesh init-model`.

- `presets.py`: named DeepSeek-V3-shaped sizes (`tiny`, `small`) and their `config.json`
- `init_model.py`: writes a preset as a deterministic random-init checkpoint in the published layout

Kept out of `expertmesh.model`, which holds what serving a real checkpoint needs. Imports only
`expertmesh.model`, `expertmesh.kernels`, `expertmesh.engine` and itself, never Ray, gRPC or FastAPI,
so a test or a demo can write a checkpoint without pulling in the serving stack.
"""

from expertmesh.testing.init_model import TensorSpec, checkpoint_tensor_specs, write_random_checkpoint
from expertmesh.testing.presets import PRESETS, ModelPreset, num_parameters, preset_config

__all__ = [
    "ModelPreset", "PRESETS", "TensorSpec", "checkpoint_tensor_specs", "num_parameters", "preset_config",
    "write_random_checkpoint",
]
