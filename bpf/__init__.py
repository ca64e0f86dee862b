"""eBPF programs (C, compiled by bcc at load time), their loaders, maps and attachments.

Everything created here is named `mbr_*` and nothing outlives `close()`/`__exit__`.
Imports nothing of ours.
"""
