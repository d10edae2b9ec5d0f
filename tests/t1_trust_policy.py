"""The trust policy: path globs, every error message (file, line, field, problem), first
match wins, trusted keys from a directory, revocation by name and by key."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from annofs.errors import UsageError
from annofs.trust.keys import generate_key, write_key_pair
from annofs.trust.pathglob import PathGlob, translate
from annofs.trust.policy import (
    Default,
    Mode,
    Policy,
    load_policy,
    parse_policy,
    permissive_policy,
    signers_needed,
)

ALICE = generate_key("alice-1")
BOB = generate_key("bob-1")
A = ALICE.public_key().to_text()
B = BOB.public_key().to_text()


def parse(text: str, path: Path = Path("policy.toml")) -> Policy:
    return parse_policy(text, path)


def error(text: str, path: Path = Path("policy.toml")) -> str:
    with pytest.raises(UsageError) as e:
        parse_policy(text, path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# -- globs ----------------------------------------------------------------------------------

GLOB_CASES = [
    ("/src/**", "/src/a", True),
    ("/src/**", "/src/a/b/c.c", True),
    ("/src/**", "/src", False),  # everything inside, not the directory itself
    ("/src/**", "/srcx/a", False),
    ("/src/**", "/src/.hidden", True),  # dot files do not escape a rule
    ("/src/**", "/src/.git/config", True),
    ("/src/**", "/src/new\nline", True),  # nor names with newlines
    ("/src/*", "/src/a", True),
    ("/src/*", "/src/.a", True),
    ("/src/*", "/src/a/b", False),
    ("/src/*.c", "/src/main.c", True),
    ("/src/*.c", "/src/main.h", False),
    ("/src/*.c", "/src/dir/main.c", False),
    ("/**/*.c", "/a.c", True),
    ("/**/*.c", "/x/y/a.c", True),
    ("/**/*.c", "/x/y/a.h", False),
    ("/a/**/b", "/a/b", True),  # zero components in the middle
    ("/a/**/b", "/a/x/y/b", True),
    ("/a/**/b", "/a/x/y/bb", False),
    ("/**", "/anything/at/all", True),
    ("/f?o", "/foo", True),
    ("/f?o", "/fo", False),
    ("/f?o", "/f/o", False),
    ("/[abc].txt", "/b.txt", True),
    ("/[abc].txt", "/d.txt", False),
    ("/[!abc].txt", "/d.txt", True),
    ("/[^abc].txt", "/a.txt", False),
    ("/[a-c]x", "/bx", True),
    ("/[]]x", "/]x", True),
    ("/[+-0]", "/.", True),  # a range that spans '/' still never matches '/'
    ("/a[+-0]b", "/a/b", False),
    ("/[!x]", "/", False),
    (r"/\*", "/*", True),
    (r"/\*", "/a", False),
    ("/a.b", "/axb", False),  # '.' is literal
    ("/a+(b)", "/a+(b)", True),
    ("/nix/store/**", "/nix/store/abc-hello/bin/hello", True),
    ("/exact/file", "/exact/file", True),
    ("/exact/file", "/exact/file2", False),
]


@pytest.mark.parametrize(("glob", "path", "expected"), GLOB_CASES)
def test_glob(glob: str, path: str, expected: bool) -> None:
    assert PathGlob(glob).matches(path) is expected


def test_glob_matches_undecodable_names() -> None:
    path = "/src/" + b"\xff\xfe".decode("utf-8", "surrogateescape")
    assert PathGlob("/src/*").matches(path)
    assert PathGlob("/src/**").matches(path + "/x")


@pytest.mark.parametrize(("glob", "message"), [
    ("src/**", "a path glob starts with '/'"),
    ("/src//x", "empty path component"),
    ("/src/", "empty path component"),
    ("/", "empty path component"),
    ("/a**", "'**' must be a whole path component"),
    ("/**b/c", "'**' must be a whole path component"),
    ("/[ab", "'[' without a closing ']'"),
    ("/ab\\", "escapes nothing"),
    ("/[z-a]", "bad character set"),
    ("/src/../etc/**", "'..' as a path component: store paths have none"),
    ("/src/./x", "'.' as a path component: store paths have none"),
    ("/..", "'..' as a path component"),
    ("/src/\\.\\./**", "'..' as a path component"),
    ("/src/x/.", "'.' as a path component"),
])
def test_glob_errors(glob: str, message: str) -> None:
    with pytest.raises(UsageError, match=None) as e:
        translate(glob)
    assert message in str(e.value)


# -- a full policy ------------------------------------------------------------------------------


def test_full_policy(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    carol = generate_key("carol-1")
    write_key_pair(carol, keys)
    (keys / "carol-1.secret").unlink()  # only *.public files are read
    (keys / "README").write_text("not a key")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f"""
mode = "warn"
default = "require"
trusted-public-keys = ["{A}", "{B}"]
trusted-keys-dir = "keys"
revoked-keys = ["bob-1"]

[[rules]]
path = "/nix/store/**"
signers = 1
claims = ["built"]
keys = ["alice-1", "carol-1"]

[[rules]]
path = "/src/**"
signers = 2

[[rules]]
path = "/scratch/**"
signers = 0
""")
    p = load_policy(policy_file)
    assert p.mode is Mode.WARN and p.default is Default.REQUIRE
    assert dict(p.trusted) == {ALICE.public: ("alice-1",), BOB.public: ("bob-1",),
                               carol.public: ("carol-1",)}
    assert p.keys_from_dir == 1
    assert p.revoked == {BOB.public}
    assert p.is_trusted(ALICE.public) and not p.is_trusted(BOB.public)
    assert not p.is_trusted(generate_key("x").public)
    r0, r1, r2 = p.rules
    assert (r0.index, r0.glob.glob, r0.signers, r0.claims) == (0, "/nix/store/**", 1, {"built"})
    assert r0.keys == {ALICE.public, carol.public} and r0.key_names == ("alice-1", "carol-1")
    assert r0.line == 8 and r1.line == 14
    assert (r1.signers, r1.claims, r1.keys) == (2, None, None)
    assert r2.signers == 0
    summary = p.summary()
    assert summary.splitlines()[0] == (
        f"{policy_file}: mode warn, default require; 3 trusted keys (1 from "
        f"trusted-keys-dir), 1 revoked; 3 rules")
    assert "key bob-1 (revoked)" in summary
    assert "rules[0] /nix/store/**: needs 1 signer; claims: built; keys: alice-1, carol-1" \
        in summary


def test_defaults() -> None:
    p = parse("")
    assert (p.mode, p.default, dict(p.trusted), p.revoked, p.rules) == \
        (Mode.ENFORCE, Default.ALLOW, {}, frozenset(), ())


def test_first_matching_rule_wins() -> None:
    p = parse("""
[[rules]]
path = "/src/vendor/**"
signers = 0
[[rules]]
path = "/src/**"
signers = 2
[[rules]]
path = "/src/vendor/special/**"
signers = 5
""")
    assert [getattr(p.rule_for(path), "index", None)
            for path in ("/src/vendor/special/x", "/src/main.c")] == [0, 1]
    assert p.rule_for("/etc/passwd") is None


def test_each_policy_gets_a_new_generation() -> None:
    assert parse("").generation != parse("").generation


def test_permissive_policy() -> None:
    p = permissive_policy()
    assert p.mode is Mode.OFF and p.rules == ()


def test_two_names_for_one_key_are_one_key() -> None:
    alias = f"alice-2:{A.split(':', 1)[1]}"
    p = parse(f'trusted-public-keys = ["{A}", "{alias}"]\n')
    assert dict(p.trusted) == {ALICE.public: ("alice-1", "alice-2")}
    assert p.name_of(ALICE.public) == "alice-1"


def test_revocation_by_name_revokes_the_key_under_every_name() -> None:
    alias = f"alice-2:{A.split(':', 1)[1]}"
    p = parse(f'trusted-public-keys = ["{A}", "{alias}", "{B}"]\nrevoked-keys = ["alice-2"]\n')
    assert p.revoked == {ALICE.public}
    assert not p.is_trusted(ALICE.public) and p.is_trusted(BOB.public)


def test_revocation_by_key() -> None:
    mallory = generate_key("mallory-1")
    # By its public key: it need not be trusted (a pre-emptive block), and the name in
    # the entry does not matter.
    p = parse(f'trusted-public-keys = ["{A}"]\n'
              f'revoked-keys = ["whoever:{base64.b64encode(mallory.public).decode()}", '
              f'"x:{A.split(":", 1)[1]}"]\n')
    assert p.revoked == {mallory.public, ALICE.public}
    assert not p.is_trusted(ALICE.public)


def test_keys_dir_is_relative_to_the_policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    (tmp_path / "conf" / "keys").mkdir(parents=True)
    write_key_pair(ALICE, tmp_path / "conf" / "keys")
    (tmp_path / "conf" / "p.toml").write_text('trusted-keys-dir = "keys"\n')
    monkeypatch.chdir(tmp_path)
    assert ALICE.public in load_policy(Path("conf/p.toml")).trusted


# -- every error ---------------------------------------------------------------------------------

ERROR_CASES = [
    ('mode = "enforce"\nmdoe = "warn"\n',
     "policy.toml:2: mdoe: unknown key (known: mode, default, trusted-public-keys, "
     "trusted-keys-dir, trusted-ssh-signers, revoked-keys, rules, trust-bundle, "
     "trust-bundle-root, on-stale, nix-database)"),
    ('[other]\nx = 1\n',
     "policy.toml:1: other: unknown key (known: mode, default, trusted-public-keys, "
     "trusted-keys-dir, trusted-ssh-signers, revoked-keys, rules, trust-bundle, "
     "trust-bundle-root, on-stale, nix-database)"),
    ('mode = "strict"\n', 'policy.toml:1: mode: must be "enforce", "warn" or "off", got "strict"'),
    ('\nmode = 1\n', 'policy.toml:2: mode: must be "enforce", "warn" or "off", got 1'),
    ('default = "deny"\n', 'policy.toml:1: default: must be "allow" or "require", got "deny"'),
    ('mode = "enforce"\nmode = "warn"\n',
     "policy.toml:2: invalid TOML: Cannot overwrite a value (column 14)"),
    ('mode = "enforce"\nx = [\n', "policy.toml:2: invalid TOML: Invalid value (at the end of "
                                  "the file)"),
    ('mode = enforce\n', "policy.toml:1: invalid TOML: Invalid value (column 8)"),
    ('trusted-public-keys = "x"\n',
     'policy.toml:1: trusted-public-keys: must be a list of strings, got "x"'),
    ('trusted-public-keys = [1]\n',
     "policy.toml:1: trusted-public-keys[0]: must be a string, got 1"),
    (f'trusted-public-keys = [\n  "{A}",\n  "bob-1:AAAA",\n]\n',
     "policy.toml:3: trusted-public-keys[1]: a public key is 32 bytes, this one is 3"),
    ('trusted-public-keys = [\n  "bob-1",\n]\n',
     "policy.toml:2: trusted-public-keys[0]: no ':' (a key is NAME:BASE64)"),
    (f'trusted-public-keys = ["{A}", "alice-1:{B.split(":", 1)[1]}"]\n',
     "policy.toml:1: trusted-public-keys[1]: key name 'alice-1' is bound to two different "
     "public keys (trusted-public-keys[0] and trusted-public-keys[1])"),
    ('trusted-keys-dir = 3\n', "policy.toml:1: trusted-keys-dir: must be a directory name, got 3"),
    ('trusted-keys-dir = "nope"\n', "policy.toml:1: trusted-keys-dir: nope: no such directory"),
    (f'trusted-public-keys = ["{A}"]\nrevoked-keys = [\n  "mallory-1",\n]\n',
     "policy.toml:3: revoked-keys[0]: 'mallory-1' names no trusted key (give NAME:BASE64 to "
     "revoke a key that is not listed)"),
    ('revoked-keys = ["x:AAAA"]\n',
     "policy.toml:1: revoked-keys[0]: a public key is 32 bytes, this one is 3"),
    ('revoked-keys = [" "]\n',
     "policy.toml:1: revoked-keys[0]: key name ' ' may not contain ':', spaces or control "
     "characters"),
    ('revoked-keys = "mallory-1"\n',
     'policy.toml:1: revoked-keys: must be a list of strings, got "mallory-1"'),
    ('rules = 5\n', "policy.toml:1: rules: must be [[rules]] tables, got 5"),
    ('[rules]\npath = "/x"\n', "policy.toml:1: rules: must be [[rules]] tables, got a table"),
    ('rules = [1]\n', "policy.toml:1: rules[0]: must be a table, got 1"),
    ('# comment\n\n[[rules]]\npath = "/src/**"\nsigners = 1\n\n[[rules]]\npath = "/x/**"\n'
     'signers = "two"\n',
     'policy.toml:9: rules[1].signers: must be a whole number >= 0, got "two"'),
    ('[[rules]]\npath = "/src/**"\nsigners = true\n',
     "policy.toml:3: rules[0].signers: must be a whole number >= 0, got true"),
    ('[[rules]]\npath = "/src/**"\nsigners = -1\n',
     "policy.toml:3: rules[0].signers: must be a whole number >= 0, got -1"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1.5\n',
     "policy.toml:3: rules[0].signers: must be a whole number >= 0, got 1.5"),
    ('[[rules]]\npath = "/src/**"\n', "policy.toml:1: rules[0]: missing 'signers'"),
    ('[[rules]]\nsigners = 1\n', "policy.toml:1: rules[0]: missing 'path'"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nsigner = 2\n',
     "policy.toml:4: rules[0].signer: unknown key (known: path, signers, claims, keys, "
     "user-presence, user-verification)"),
    ('[[rules]]\npath = 5\nsigners = 1\n',
     'policy.toml:2: rules[0].path: must be a path glob like "/src/**", got 5'),
    ('[[rules]]\npath = "src/**"\nsigners = 1\n',
     "policy.toml:2: rules[0].path: 'src/**': a path glob starts with '/' (e.g. /src/**)"),
    ('[[rules]]\npath = "/src/a**"\nsigners = 1\n',
     "policy.toml:2: rules[0].path: '/src/a**': '**' must be a whole path component"),
    ('[[rules]]\npath = "/src/../etc/**"\nsigners = 1\n',
     "policy.toml:2: rules[0].path: '/src/../etc/**': '..' as a path component: store "
     "paths have none, so the rule would match nothing"),
    ('[[rules]]\npath = "/src//x"\nsigners = 1\n',
     "policy.toml:2: rules[0].path: '/src//x': empty path component"),
    ('[[rules]]\npath = "/src/[a"\nsigners = 1\n',
     "policy.toml:2: rules[0].path: '/src/[a': '[' without a closing ']'"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nclaims = "built"\n',
     'policy.toml:4: rules[0].claims: must be a list of strings, got "built"'),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nclaims = []\n',
     "policy.toml:4: rules[0].claims: empty list (no statement could count; omit 'claims' to "
     "accept any claim)"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nclaims = ["label"]\n',
     "policy.toml:4: rules[0].claims[0]: 'label' is reserved: a label never approves a file"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nclaims = ["Built"]\n',
     "policy.toml:4: rules[0].claims[0]: claim 'Built': must be a lowercase word matching "
     "[a-z][a-z0-9-]{0,31}"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nkeys = []\n',
     "policy.toml:4: rules[0].keys: empty list (no key could count; omit 'keys' to accept "
     "every trusted key)"),
    ('[[rules]]\npath = "/src/**"\nsigners = 1\nkeys = ["zed-1"]\n',
     "policy.toml:4: rules[0].keys[0]: 'zed-1' is not a trusted key (not in "
     "trusted-public-keys nor trusted-keys-dir)"),
    (f'trusted-public-keys = ["{A}", "alice-2:{A.split(":", 1)[1]}"]\n[[rules]]\n'
     f'path = "/src/**"\nsigners = 2\nkeys = ["alice-1", "alice-2"]\n',
     "policy.toml:4: rules[0].signers: needs 2 distinct keys but 'keys' names only 1 "
     "distinct public key"),
    ('rules = [{path = "/a/**", signers = 1}, {path = "/b/**", signers = "x"}]\n',
     'policy.toml:1: rules[1].signers: must be a whole number >= 0, got "x"'),
]


@pytest.mark.parametrize(("text", "message"), ERROR_CASES)
def test_error(text: str, message: str) -> None:
    assert error(text) == message


def test_key_file_errors_name_the_key_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "bad.public").write_text("bob-1")
    (tmp_path / "p.toml").write_text('mode = "enforce"\ntrusted-keys-dir = "keys"\n')
    with pytest.raises(UsageError) as e:
        load_policy(tmp_path / "p.toml")
    assert str(e.value) == (f"{tmp_path}/p.toml:2: trusted-keys-dir: {keys}/bad.public: "
                            f"no ':' (a key is NAME:BASE64)")


def test_keys_dir_name_clash(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "a.public").write_text(f"alice-1:{B.split(':', 1)[1]}")
    with pytest.raises(UsageError) as e:
        parse(f'trusted-public-keys = ["{A}"]\ntrusted-keys-dir = "keys"\n',
              tmp_path / "p.toml")
    assert str(e.value) == (f"{tmp_path}/p.toml:2: trusted-keys-dir: key name 'alice-1' is "
                            f"bound to two different public keys (trusted-public-keys[0] and "
                            f"{keys}/a.public)")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^{tmp_path}/none.toml: no such policy file$"):
        load_policy(tmp_path / "none.toml")
    with pytest.raises(UsageError, match="is a directory"):
        load_policy(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b'mode = "enforce"\n# \xff\n')
    with pytest.raises(UsageError, match=f"^{tmp_path}/bin.toml:2: not UTF-8 text$"):
        load_policy(tmp_path / "bin.toml")


# Components of the random globs and paths below: few enough that globs and paths meet.
_NAMES = ["a", "b", "src", ".h", "x.c"]
_GLOB_PARTS = [*_NAMES, "*", "**", "?", "*.c", "[ab]", "s*"]


@settings(max_examples=300, deadline=None)
@given(globs=st.lists(st.lists(st.sampled_from(_GLOB_PARTS), min_size=1, max_size=4),
                      min_size=1, max_size=4),
       paths=st.lists(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=5),
                      min_size=1, max_size=8))
def test_rule_at_decided_per_directory_is_rule_for_of_the_path(
        globs: list[list[str]], paths: list[list[str]]) -> None:
    """The directory-wide plan (`Policy.rule_at`) picks the rule the glob-by-glob match
    (`rule_for`) picks, for any rules in any order, asked in any order (the memo)."""
    text = "".join(f'[[rules]]\npath = "/{"/".join(g)}"\nsigners = 0\n' for g in globs)
    try:
        pol = parse(text)
    except UsageError:
        return  # e.g. '**' twice in a row is still a valid glob; others may not be
    for parts in paths:
        names = [p.encode() for p in parts]
        want = pol.rule_for("/" + "/".join(parts))
        got = pol.rule_at(names)
        assert (got.index if got else None) == (want.index if want else None), parts


def test_a_directory_wide_rule_after_name_rules_keeps_policy_order() -> None:
    pol = parse('[[rules]]\npath = "/src/*.h"\nsigners = 0\n'
                '[[rules]]\npath = "/src/**"\nsigners = 1\n'
                '[[rules]]\npath = "/**"\nsigners = 2\n')
    assert pol.rule_at([b"src", b"a.h"]).index == 0  # type: ignore[union-attr]
    assert pol.rule_at([b"src", b"a.c"]).index == 1  # type: ignore[union-attr]
    assert pol.rule_at([b"src", b"d", b"a.h"]).index == 1  # type: ignore[union-attr]
    assert pol.rule_at([b"other"]).index == 2  # type: ignore[union-attr]
    assert pol.rule_at([b"src"]).index == 2  # type: ignore[union-attr]


def test_a_double_star_before_the_last_keeps_its_meaning() -> None:
    """`/a/**/**` matches /a/a (the first `**` may be empty): decided per directory, the
    glob before the last `/**` must keep that `**` as zero or more components (found by
    the hypothesis test above in CI)."""
    pol = parse('[[rules]]\npath = "/a/**/**"\nsigners = 0\n'
                '[[rules]]\npath = "/**/**"\nsigners = 1\n')
    assert pol.rule_for("/a/a") is not None and pol.rule_at([b"a", b"a"]).index == 0  # type: ignore[union-attr]
    assert pol.rule_at([b"b"]).index == 1  # type: ignore[union-attr]
    assert pol.rule_at([b"a"]).index == 1  # type: ignore[union-attr]


def _rules(*globs: str) -> Policy:
    return parse("".join(f'[[rules]]\npath = "{g}"\nsigners = {i % 2}\n'
                         for i, g in enumerate(globs)))


def _parts(path: str) -> list[bytes]:
    return [p.encode() for p in path.strip("/").split("/")]


@pytest.mark.parametrize("globs,old,new,same", [
    # One directory-wide rule covers both, nothing before it reaches below: the same.
    (("/src/**", "/scratch/**"), "/src/proj/a", "/src/proj/b", True),
    (("/nix/store/**",), "/nix/store/h-x.drv.chroot/nix/store/o-x", "/nix/store/o-x", True),
    ((), "/a", "/b", True),  # the default everywhere
    (("/src/proj/vendor/**", "/src/**"), "/src/a", "/src/b", True),
    # Another rule for one side: not the same.
    (("/src/**", "/scratch/**"), "/src/proj/d", "/scratch/d", False),
    # The directories' own paths share /src/**, their contents do not: a carve-out.
    (("/src/proj/vendor/**", "/src/**"), "/src/proj/d", "/src/proj/vendor", False),
    (("/src/proj/d/x/**", "/src/**"), "/src/proj/d", "/src/proj/e", False),
    # A rule matching names (not ending in /**) may tell contents apart: not sure.
    (("/lib/**/*.so", "/**"), "/lib/x", "/scratch/x", False),
])
def test_same_rules_below_is_sure_or_says_no(globs: tuple[str, ...], old: str, new: str,
                                             same: bool) -> None:
    # A directory moved from `old` to `new` keeps its contents' rules only if this says
    # so (fs/enforce.py records the move otherwise): every name below, checked here.
    p = _rules(*globs)
    assert p.same_rules_below(_parts(old), _parts(new)) is same
    if same:
        for rel in ("f", "x/f", "vendor/f", "d/x/f", "a/b.so"):
            assert p.rule_for(f"{old}/{rel}") == p.rule_for(f"{new}/{rel}"), rel


@pytest.mark.parametrize("globs,d,maybe", [
    (("/scratch/**", "/src/**"), "/scratch/x", False),
    (("/scratch/**", "/src/**"), "/src/x", True),
    (("/src/proj/vendor/**", "/src/**"), "/src/proj/vendor/x", False),
    (("/src/proj/vendor/**", "/src/**"), "/src/proj", True),
    (("/none/**", "/lib/**/*.so", "/**"), "/lib/x", True),  # a rule by name reaches in
    (("/none/**", "/lib/**/*.so", "/**"), "/scratch/x", False),
    ((), "/a", False),  # the default allows
])
def test_signers_below_is_sure_or_says_maybe(globs: tuple[str, ...], d: str,
                                            maybe: bool) -> None:
    # A directory moved where no name below can need signers carries no FIFO into
    # trouble (fs/operations.py looks through it otherwise): every name below, checked.
    p = _rules(*globs)
    assert p.signers_below(_parts(d)) is maybe
    needed = [signers_needed(p, p.rule_for(f"{d}/{rel}"))
              for rel in ("f", "x/f", "vendor/f", "d/x/f", "a/b.so")]
    assert any(needed) is maybe
