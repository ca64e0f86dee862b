"""The `membrane` command line: argument parsing and output formats of every command; logic lives in the library."""
