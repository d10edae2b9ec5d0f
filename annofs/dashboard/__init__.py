"""The dashboard (SPEC §7): a read-only web page served by the daemon's own trio loop.

- `server`: the listen address (loopback unless asked), binding, hypercorn on trio.
- `coverage`: signature coverage per directory, files, histories (computed from the store).
- `app`: the Starlette routes, the live feed as server-sent events.
- `static/`: the page itself (plain HTML, CSS and JavaScript; nothing from the network).
"""
