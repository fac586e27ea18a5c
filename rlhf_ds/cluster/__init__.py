"""Where role processes run and how the controller reaches them: the group interface (``group``), Ray
groups (``ray_group``), SPMD groups under the deepspeed launcher (``spmd_group``), placement planning
and the start-up of a run's groups (``roles``). Ray is imported here and nowhere else in the package;
import the submodules directly (this package's ``__init__`` imports no Ray)."""
