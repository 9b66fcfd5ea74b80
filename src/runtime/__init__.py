"""What every command shares at run time: one-line errors and the jobs of a command line."""
