"""The model root's sparse side: packet format (:mod:`.packets`), full checkpoints
(:mod:`.checkpoint`), publishing packets (:mod:`.incremental`) and following them
(:mod:`.hotload`)."""
