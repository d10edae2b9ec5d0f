"""The daemon: mount lifecycle on trio, the control channel, events, the dashboard."""
