"""The agent's own voice in the microphone: echo cancellation (AEC3), double talk, the linear echo
path, simulated rooms, and ``--check-audio``."""
