"""Speaking: LLM text -> sentences -> words CSM can say -> CSM (in-process or csm-serve) -> a
playback plan without gaps; and ``--replay``."""
