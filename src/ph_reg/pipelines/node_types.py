"""The library types named in the node signatures, resolvable without importing torch.

Kedro evaluates every node's annotations (``typing.get_type_hints``) when it reads the parameters, to find the
``params:`` inputs typed as dataclasses or pydantic models, which it validates; a name it cannot resolve costs a
"Could not extract type hints" warning per node on every ``kedro`` command, ``kedro viz`` and notebook. The classes
below live in modules that import torch, which loading the pipelines must not do (``kedro viz`` starts fast;
tests/integration/test_import_light.py). So type checkers see the real classes, and at run time each name stands for
``typing.Any``: none of them is the type of a parameter.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

    from ph_reg.data.prepare import DataPreparationConfig
    from ph_reg.method.config import StudentDistillationConfig
    from ph_reg.method.targets import OnlineTargets, TeacherDenoisingConfig
    from ph_reg.io.shards import RecordStream, ShardReader
    from ph_reg.models import BackboneConfig, DenseViT
else:
    Tensor = Dataset = OnlineTargets = RecordStream = ShardReader = BackboneConfig = DenseViT = Any
    DataPreparationConfig = StudentDistillationConfig = TeacherDenoisingConfig = Any

__all__ = ["BackboneConfig", "DataPreparationConfig", "Dataset", "DenseViT", "OnlineTargets", "RecordStream",
           "ShardReader", "StudentDistillationConfig", "TeacherDenoisingConfig", "Tensor"]
