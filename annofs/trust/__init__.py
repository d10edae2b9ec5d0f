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

from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.trust.keys import PublicKey, SecretKey, load_public_key, load_secret_key
from annofs.trust.policy import (
    Default,
    Mode,
    Policy,
    load_policy,
    parse_policy,
    permissive_policy,
)
from annofs.trust.statement import SignedStatement, Statement
from annofs.trust.verdict import Verdict, VerdictCache, decide

__all__ = [
    "AnnotationStore",
    "Default",
    "Mode",
    "Policy",
    "PublicKey",
    "SecretKey",
    "SignedStatement",
    "Statement",
    "TrustGate",
    "Verdict",
    "VerdictCache",
    "decide",
    "load_policy",
    "load_public_key",
    "load_secret_key",
    "parse_policy",
    "permissive_policy",
]
