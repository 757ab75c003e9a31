"""The checkpoint format and its life cycle: the run folder's layout (``run_layout``), saving, finding and resuming
checkpoints (``checkpoint``), the manifest that proves a checkpoint whole (``manifest``), resuming on another world
size (``reshard``) and stopping on a signal with a checkpoint (``preemption``)."""
