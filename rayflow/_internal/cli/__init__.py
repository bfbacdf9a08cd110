"""The command line's parts: reaching Ray, output and errors, live progress."""
