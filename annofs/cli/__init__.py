"""The `annofs` command: talks to a running daemon when mounted, to the store otherwise."""
