"""The agent: asyncio/uvloop listeners, sessions wiring parsers to policy verdicts, flows, CLI."""
