"""Random-weight models in the real file formats, for tests and for trying the engine without hub access.

Nothing in the engine or the agent imports this package; tests, benchmarks and users do.
"""
