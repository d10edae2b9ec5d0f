"""Trust: keys, signed statements bound to content, the policy, and verdicts.

Modules, one job each:

- `keys`: Nix-format ed25519 keys (parse, generate, sign, verify).
- `statement`: statements as in-toto Statement v1 in DSSE envelopes (make, sign, parse).
- `annotations`: statements stored in LMDB, indexed by content digest and fragment.
- `pathglob`: the policy's path globs.
- `policy`: the TOML policy.
- `verdict`: `decide`, the one function that says whether a file may be read; its cache.
- `signing`: which files of the namespace a PATH argument means, and signing them.
- `gate`: `TrustGate`, what the filesystem asks: verdicts under all of a file's names,
  whether a file is guarded, the EXDEV rule for hard links.
- `admission`: which handles a file may have at once and which may use the kernel's
  page cache, so a reader sees only the bytes it was judged on.
"""

# Nothing imported here: importing a submodule runs this first, and `annofs log` needs
# statements, not the gate (which brings the Nix store check, NAR and sqlite3).
