"""Tools the agent can call: built-in ones (clock, calculator, timers, memory) and MCP servers' tools."""
