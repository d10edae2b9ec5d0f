"""Copying trees between the host and the store: import (incremental) and export."""
