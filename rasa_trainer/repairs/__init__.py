"""Repairs of the selected experts inside the fused expert tensors: the repair layer, the experts function registered in transformers' ExpertsInterface and the lifecycle (``layer``), PEFT adapter export and load (``adapter``)."""

from .layer import ExpertRepairs, attach_repairs, disable_repairs, merge_repairs, merged_for_saving, merged_state_dict, repair_modules, restore_routers, unload_repairs, unmerge_repairs, upcast_routers

__all__ = ['ExpertRepairs', 'attach_repairs', 'disable_repairs', 'merge_repairs', 'merged_for_saving', 'merged_state_dict', 'repair_modules', 'restore_routers', 'unload_repairs', 'unmerge_repairs', 'upcast_routers']
