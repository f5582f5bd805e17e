"""Step 3, RASA training: ``RASAConfig`` (``config``) and ``RASATrainer`` (``trainer``), one class customising
``SFTTrainer`` through its hooks, and the objects it owns: the phase controller (``phases``, over ``schedule``), the
parameter groups (``param_groups``), the routing replay (``routing_replay``), the router loss (``router_loss``, over
the pure ``losses``), pair rows (``training_data``), retain rows (``retain``) and the selection a run trains
(``run_selection``). Saving and resume (``saving``) sit on the checkpoint files (``checkpoints``), the run's identity
(``run_identity``) and the output folder's lock and link checks (``output_folder``); the model card in
``model_card``."""

from .config import RASAConfig
from .trainer import RASATrainer

__all__ = ["RASAConfig", "RASATrainer"]
