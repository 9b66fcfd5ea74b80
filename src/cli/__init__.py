"""What the commands do: compose and validate the config, expand a command line into jobs, one run (`src.run`), a
campaign (`src.campaign`)."""
