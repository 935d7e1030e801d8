"""csm_engine: text + conversation context -> speech with Sesame's Conversational Speech Model."""

from csm_engine.config import SAMPLE_RATE, CSMConfig, get_flavor
from csm_engine.errors import CSMError

__all__ = ["SAMPLE_RATE", "CSMConfig", "CSMError", "get_flavor"]
