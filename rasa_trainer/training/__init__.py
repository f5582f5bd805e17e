"""Step 3: ``RASAConfig`` (``config``) and ``RASATrainer`` (``trainer``) with the objects it owns: the phase schedule (``phases``), parameter groups (``param_groups``), the router loss (``router_loss``), pair rows (``training_data``), retain rows (``retain``), saving and resume (``saving``), the model card (``model_card``)."""

from .config import RASAConfig
from .trainer import RASATrainer

__all__ = ['RASAConfig', 'RASATrainer']
