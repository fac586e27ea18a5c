"""Role groups: Ray actors per rank (ray_group) or this process's rank under the deepspeed launcher
(local_group), behind the same fan-out verbs. Import the submodules directly; this package imports no Ray."""
