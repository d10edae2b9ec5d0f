"""Nix-format ed25519 keys: parsing (every error), generation, signing, and interop with
the real Nix both ways (keys made by either tool, signatures checked by the other)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from annofs.errors import ExistsError, UsageError
from annofs.trust.keys import (
    PublicKey,
    SecretKey,
    generate_key,
    load_public_key,
    load_secret_key,
    parse_public_key,
    parse_secret_key,
    verify_signature,
    write_key_pair,
)

# RFC 8032 §7.1, TEST 1: seed, public key, and the signature of the empty message.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIG = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39"
    "701cf9b46bd25bf5f0595bbe24655141438e7a100b")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# -- parsing ------------------------------------------------------------------------------


def test_rfc8032_vector() -> None:
    key = parse_secret_key(f"rfc-1:{b64(RFC_SEED + RFC_PUBLIC)}", "k")
    assert key.public == RFC_PUBLIC
    assert key.sign(b"") == RFC_SIG
    pub = parse_public_key(f"rfc-1:{b64(RFC_PUBLIC)}", "k")
    assert pub.verify(b"", RFC_SIG)
    assert not pub.verify(b"x", RFC_SIG)
    assert key.public_key() == pub
    assert pub.to_text() == f"rfc-1:{b64(RFC_PUBLIC)}"
    assert key.to_text() == f"rfc-1:{b64(RFC_SEED + RFC_PUBLIC)}"


def test_trailing_newline_is_tolerated() -> None:
    assert parse_public_key(f"a:{b64(RFC_PUBLIC)}\n", "k").key == RFC_PUBLIC


@pytest.mark.parametrize(("text", "message"), [
    ("nocolonhere", "k: no ':' (a key is NAME:BASE64)"),
    (f":{b64(RFC_PUBLIC)}", "k: the key name is empty (expected NAME:BASE64)"),
    ("name:", "k: nothing after ':' (a key is NAME:BASE64)"),
    ("na me:AAAA", "k: key name 'na me' may not contain ':', spaces or control characters"),
    ("name:not base64!", "k: the public key is not valid base64"),
    ("name:" + b64(RFC_PUBLIC).rstrip("="), "k: the public key is not valid base64"),
    ("name:" + b64(RFC_PUBLIC[:31]), "k: a public key is 32 bytes, this one is 31"),
    ("name:" + b64(RFC_SEED + RFC_PUBLIC),
     "k: a public key is 32 bytes, this one is 64 (this looks like a secret key)"),
    (f"a:{b64(RFC_PUBLIC)}\nb:{b64(RFC_PUBLIC)}",
     "k: a key is one line (NAME:BASE64), found several"),
])
def test_public_key_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_public_key(text, "k")
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(("text", "message"), [
    ("name:" + b64(RFC_PUBLIC),
     "k: a secret key is 64 bytes, this one is 32 (this looks like a public key)"),
    ("name:" + b64(RFC_SEED + bytes(32)),
     "k: the secret key's public half does not match its seed"),
    ("name:" + b64(RFC_SEED + RFC_PUBLIC)[:-4] + "!!!=", "k: the secret key is not valid base64"),
])
def test_secret_key_errors(text: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_secret_key(text, "k")
    assert str(e.value).startswith(message)


def test_non_canonical_base64_is_refused() -> None:
    # The last character carries unused bits: a different character decodes to the same
    # bytes. A key file must have one spelling.
    text = b64(RFC_PUBLIC)
    assert text.endswith("o=")
    with pytest.raises(UsageError, match="not canonical base64"):
        parse_public_key("a:" + text[:-2] + "p=", "k")


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path}/missing: no such key file$"):
        load_secret_key(tmp_path / "missing")
    with pytest.raises(UsageError, match="is a directory"):
        load_public_key(tmp_path)
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match=f"^{tmp_path}/bin: not a key file"):
        load_public_key(tmp_path / "bin")
    (tmp_path / "bad").write_text("x")
    with pytest.raises(UsageError, match=f"^{tmp_path}/bad: no ':'"):
        load_secret_key(tmp_path / "bad")


def test_secret_key_repr_hides_the_seed() -> None:
    key = generate_key("k-1")
    assert key.seed.hex() not in repr(key) and b64(key.seed) not in repr(key)


def test_verify_rejects_wrong_sizes() -> None:
    assert not verify_signature(RFC_PUBLIC[:31], b"", RFC_SIG)
    assert not verify_signature(RFC_PUBLIC, b"", RFC_SIG[:63])
    assert not verify_signature(bytes(32), b"", RFC_SIG)


# -- generating and writing ---------------------------------------------------------------------


def test_generate_sign_verify(tmp_path: Path) -> None:
    key = generate_key("alice-1")
    secret, public = write_key_pair(key, tmp_path)
    assert (secret.name, public.name) == ("alice-1.secret", "alice-1.public")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert not secret.read_bytes().endswith(b"\n")  # as nix-store writes them
    loaded = load_secret_key(secret)
    pub = load_public_key(public)
    assert loaded.public == pub.key == key.public and loaded.seed == key.seed
    sig = loaded.sign(b"message")
    assert pub.verify(b"message", sig)
    assert not pub.verify(b"messagE", sig)
    assert not PublicKey("other", generate_key("o").public).verify(b"message", sig)


def test_generate_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        _, public = write_key_pair(generate_key("k"), tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


@pytest.mark.parametrize("existing", ["k.secret", "k.public"])
def test_generate_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(ExistsError, match="already exists"):
        write_key_pair(generate_key("k"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]
    assert (tmp_path / existing).read_text() == "keep me"


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "-dash"])
def test_generate_refuses_unsafe_file_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        write_key_pair(SecretKey(name, RFC_SEED, RFC_PUBLIC), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_bad_names() -> None:
    for name in ("", "a:b", "a b"):
        with pytest.raises(UsageError):
            generate_key(name)


def test_generate_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        write_key_pair(generate_key("k"), tmp_path / "nope")


# -- the real Nix ------------------------------------------------------------------------------

needs_nix = pytest.mark.skipif(shutil.which("nix-store") is None or shutil.which("nix") is None,
                               reason="Nix (Debian's nix-bin) is not installed")
NIX = ["nix", "--extra-experimental-features", "nix-command"]


def nix_env(tmp: Path) -> dict[str, str]:
    """Nix with its caches in `tmp` (the narinfo cache would remember old answers)."""
    env = dict(os.environ)
    env.update(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "cache-home"),
               XDG_STATE_HOME=str(tmp / "state-home"), XDG_CONFIG_HOME=str(tmp / "cfg-home"))
    return env


def run(cmd: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          **kw)  # type: ignore[call-overload]


@needs_nix
def test_nix_made_key_works_in_annofs(tmp_path: Path) -> None:
    env = nix_env(tmp_path)
    secret, public = tmp_path / "n.secret", tmp_path / "n.public"
    proc = run(["nix-store", "--generate-binary-cache-key", "nixmade-1", str(secret),
                str(public)], env)
    assert proc.returncode == 0, proc.stderr
    key = load_secret_key(secret)
    pub = load_public_key(public)
    assert key.name == pub.name == "nixmade-1"
    assert key.public_key() == pub  # annofs derives the same public key from the secret
    assert pub.verify(b"1;/nix/store/x;sha256:y;1;", key.sign(b"1;/nix/store/x;sha256:y;1;"))


@needs_nix
def test_annofs_made_key_works_in_nix(tmp_path: Path) -> None:
    env = nix_env(tmp_path)
    secret, public = write_key_pair(generate_key("annofs-1"), tmp_path)
    proc = run([*NIX, "key", "convert-secret-to-public"], env, input=secret.read_text())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == public.read_text()


@pytest.fixture(scope="module")
def nix_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """A binary cache made by Nix holding one input-addressed-looking path.

    The path is added to a chroot store and copied to a file:// cache; its narinfo's CA
    line is dropped so that Nix needs a signature to trust it (a content-addressed path is
    trusted without one). Returns (cache dir, store path, narinfo file).
    """
    if shutil.which("nix") is None:
        pytest.skip("Nix is not installed")
    tmp = tmp_path_factory.mktemp("nix")
    env = nix_env(tmp)
    (tmp / "hello.txt").write_text("hello from annofs\n")
    root = f"local?root={tmp / 'root'}"
    proc = run([*NIX, "store", "add-file", "--store", root, str(tmp / "hello.txt")], env)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    cache = tmp / "cache"
    proc = run([*NIX, "copy", "--store", root, "--to", f"file://{cache}", path], env)
    assert proc.returncode == 0, proc.stderr
    narinfo = cache / (Path(path).name.split("-")[0] + ".narinfo")
    lines = [ln for ln in narinfo.read_text().splitlines()
             if not ln.startswith(("CA:", "Sig:"))]
    narinfo.write_text("\n".join(lines) + "\n")
    return cache, path, narinfo


def fingerprint(narinfo: Path) -> str:
    """Nix's narinfo fingerprint: 1;StorePath;NarHash;NarSize;References."""
    fields: dict[str, str] = {}
    for ln in narinfo.read_text().splitlines():
        name, _, value = ln.partition(":")
        fields[name] = value.strip()
    refs = ",".join("/nix/store/" + r for r in sorted(fields.get("References", "").split()))
    assert re.fullmatch(r"sha256:[0-9a-z]{52}", fields["NarHash"])
    return f"1;{fields['StorePath']};{fields['NarHash']};{fields['NarSize']};{refs}"


def nix_verify(cache: Path, path: str, trusted: str, tmp: Path) -> subprocess.CompletedProcess:
    return run([*NIX, "store", "verify", "--store", f"file://{cache}", "--no-contents",
                "--trusted-public-keys", trusted, "--sigs-needed", "1", path], nix_env(tmp))


@needs_nix
def test_annofs_signature_verifies_in_nix(nix_cache: tuple[Path, str, Path],
                                          tmp_path: Path) -> None:
    cache, path, narinfo = nix_cache
    original = narinfo.read_text()
    key = generate_key("annofs-1")
    other = generate_key("annofs-1")  # same name, another key: must not be accepted
    sig = key.sign(fingerprint(narinfo).encode())
    try:
        narinfo.write_text(original + f"Sig: {key.name}:{b64(sig)}\n")
        ok = nix_verify(cache, path, key.public_key().to_text(), tmp_path / "a")
        assert ok.returncode == 0, ok.stderr
        bad = nix_verify(cache, path, other.public_key().to_text(), tmp_path / "b")
        assert bad.returncode != 0 and "untrusted" in bad.stderr
        flipped = bytes([sig[0] ^ 1]) + sig[1:]
        narinfo.write_text(original + f"Sig: {key.name}:{b64(flipped)}\n")
        bad = nix_verify(cache, path, key.public_key().to_text(), tmp_path / "c")
        assert bad.returncode != 0 and "untrusted" in bad.stderr
    finally:
        narinfo.write_text(original)


@needs_nix
def test_nix_signature_verifies_in_annofs(tmp_path: Path) -> None:
    """Nix signs a path with a key annofs generated; annofs checks Nix's signature."""
    env = nix_env(tmp_path)
    secret, public = write_key_pair(generate_key("annofs-2"), tmp_path)
    (tmp_path / "f.txt").write_text("signed by nix\n")
    root = f"local?root={tmp_path / 'root'}"
    proc = run([*NIX, "store", "add-file", "--store", root, str(tmp_path / "f.txt")], env)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    proc = run([*NIX, "store", "sign", "--store", root, "--key-file", str(secret), path], env)
    assert proc.returncode == 0, proc.stderr
    cache = tmp_path / "cache"
    proc = run([*NIX, "copy", "--store", root, "--to", f"file://{cache}", path], env)
    assert proc.returncode == 0, proc.stderr
    narinfo = cache / (Path(path).name.split("-")[0] + ".narinfo")
    sigs = [ln.split(": ", 1)[1] for ln in narinfo.read_text().splitlines()
            if ln.startswith("Sig: ")]
    assert len(sigs) == 1
    name, sig = sigs[0].split(":", 1)
    pub = load_public_key(public)
    assert name == pub.name
    fp = fingerprint(narinfo).encode()
    assert pub.verify(fp, base64.b64decode(sig))
    assert not pub.verify(fp + b"x", base64.b64decode(sig))
