"""Sans-I/O protocol parsers: bytes in, typed events out, plus the bytes of a refusal.

Never imports asyncio, socket, uvloop or anything of ours outside `parsers/`; never reads a clock.
"""
